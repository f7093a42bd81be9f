"""embed_shard: one pool shard in, its vectors, ids and bad-sample report out. No Ray here.

The encoder is any object with ``preprocess(PIL) -> Tensor``, ``embed(Tensor) -> ndarray`` and
``dim`` (sept.training.encoder.EncoderBundle). Reading the tar, decoding and preprocessing run on
a reader thread and a pool of decode threads (PIL and torchvision release the GIL in their C
code), ``prefetch`` batches ahead of the model, so the model is not starved while images decode.
Memory stays bounded: at most ``(prefetch + 2) * batch_size`` images are decoded at once.

Bad samples go through the one skip-and-count policy (``sept.data.decode.decode_sample``); the
report lists each by key and reason, and counts them by kind (``BAD_KINDS``).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sept.data.decode import DEFAULT_MAX_PIXELS, decode_sample
from sept.data.identity import make_ids
from sept.data.samples import PoolSample, ShardStats, image_member, iter_samples

BAD_KINDS = ("undecodable", "zero_byte", "no_image", "truncated", "too_large")
"""The kinds of bad sample the embed summary counts; every skip reason maps to exactly one."""

MAX_LISTED_BAD = 10_000
"""Bad samples listed by key per shard (all are counted); a shard of pure junk stays a small report."""


def bad_kind(reason: str) -> str:
    """The kind (one of ``BAD_KINDS``) of a skip reason written by sept.data.decode or .samples."""
    if reason.startswith("truncated shard"):
        return "truncated"
    if reason.startswith("no image member"):
        return "no_image"
    detail = reason.split(": ", 1)[1] if ": " in reason else reason  # drop the "jpg: " prefix
    if detail.startswith("empty image bytes"):
        return "zero_byte"
    if detail.startswith("image too large"):
        return "too_large"
    return "undecodable"


@dataclass
class DecodeOptions:
    """How a shard's images are turned into model input."""

    batch_size: int = 256
    decode_threads: int = 2
    prefetch: int = 2  # ready batches queued ahead of the model
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse images above this before decoding their pixels


HASH_BYTES = 16
"""Content hashes are 128-bit blake2b digests of a sample's image bytes, stored as two uint64 words:
at 10^10 samples a chance collision is still about 10^-19."""

_END = object()


def content_hash(data: bytes) -> np.ndarray:
    """The (2,) uint64 content hash of image bytes: equal bytes, equal hash."""
    return np.frombuffer(hashlib.blake2b(data, digest_size=HASH_BYTES).digest(), dtype="<u8").copy()


def embed_shard(
    encoder,
    shard_path: str,
    shard_index: int,
    *,
    batch_size: int = 256,
    decode_threads: int = 2,
    prefetch: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(vectors (n, dim) float32, ids (n,) int64, content hashes (n, 2) uint64, report) for the
    decodable samples of one shard. The hash is of the image member's bytes (``content_hash``).

    Ids follow tar order whatever order decoding finishes in. Raises SeptError for shard-level
    faults (missing file, not a tar, non-adjacent members of one key); everything per-sample is
    skipped and counted in the report.
    """
    opts = DecodeOptions(batch_size, max(1, decode_threads), max(1, prefetch), max_pixels)
    stats = ShardStats()
    vectors: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    for batch, batch_positions, batch_hashes in _prepared_batches(encoder, shard_path, stats, opts):
        vectors.append(encoder.embed(batch))
        positions.append(batch_positions)
        hashes.append(batch_hashes)
    dim = int(encoder.dim)
    x = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    h = np.concatenate(hashes) if hashes else np.zeros((0, 2), np.uint64)
    return x, make_ids(shard_index, pos), h, shard_report(stats)


def shard_report(stats: ShardStats) -> dict:
    """The per-shard report stored with the shard's vectors: counts, kinds and listed bad samples."""
    kinds = {kind: 0 for kind in BAD_KINDS}
    for _, reason in stats.bad_samples:
        kinds[bad_kind(reason)] += 1
    return dict(
        samples=int(stats.samples),
        bad=int(stats.bad),
        bad_kinds=kinds,
        truncated=bool(stats.truncated),
        bad_samples=[[key, reason] for key, reason in stats.bad_samples[:MAX_LISTED_BAD]],
    )


def _prepare(encoder, sample: PoolSample, max_pixels: int) -> tuple[torch.Tensor | None, ShardStats, np.ndarray | None]:
    """Decode, preprocess and hash one sample on a decode thread; its skip record is private to it."""
    own = ShardStats()
    image = decode_sample(sample, own, max_pixels=max_pixels)
    if image is None:
        return None, own, None
    return encoder.preprocess(image), own, content_hash(image_member(sample)[1])


def _prepared_batches(encoder, shard_path: str, stats: ShardStats, opts: DecodeOptions):
    """Yields (batch tensor, positions, content hashes) in tar order, decoded ahead of the caller by a reader thread."""
    ready: queue.Queue = queue.Queue(maxsize=opts.prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            with ThreadPoolExecutor(opts.decode_threads, thread_name_prefix="sept-decode") as pool:
                pending: list[tuple[PoolSample, Future]] = []
                for sample in iter_samples(shard_path, stats):
                    pending.append((sample, pool.submit(_prepare, encoder, sample, opts.max_pixels)))
                    if len(pending) >= opts.batch_size:
                        if not put(_collect(pending, stats)):
                            return
                        pending = []
                if pending and not put(_collect(pending, stats)):
                    return
            put(_END)
        except BaseException as exc:  # re-raised in the consuming thread, which owns the error
            put(exc)

    thread = threading.Thread(target=reader, name=f"sept-read-{shard_path}", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if item is not None:
                yield item
    finally:
        stop.set()
        thread.join()


def _collect(pending: list[tuple[PoolSample, Future]], stats: ShardStats):
    """Wait for a batch's decodes in tar order; record skips in order; None if all were bad."""
    tensors, positions, hashes = [], [], []
    for sample, future in pending:
        tensor, own, digest = future.result()
        for key, reason in own.bad_samples:
            stats.add_bad(key, reason)
        if tensor is not None:
            tensors.append(tensor)
            positions.append(sample.position)
            hashes.append(digest)
    if not tensors:
        return None
    return torch.stack(tensors), np.asarray(positions, dtype=np.int64), np.stack(hashes)
