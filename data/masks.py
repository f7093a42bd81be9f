"""Felzenszwalb–Huttenlocher segmentation masks stored inside WebDataset shards (for DetCon).

``add_masks`` copies shards, every member byte-for-byte, adding to each sample with an image a
``{key}.mask.png`` member: an 8-bit label map of the image's FH segments (scikit-image's
``felzenszwalb``), one label per segment, at the image's own resolution. The masks are computed
once per sample, in parallel (a process pool over samples), and travel with the shards, so
training never segments an image twice and any job (or node) reading the shards gets them.

Output shards are written under a temporary name and renamed into place, so an existing output
is complete: a rerun (a requeued job) skips it. Undecodable samples are copied without a mask
and counted; the trainer skips them as it skips any bad sample.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sept.data.decode import BadSample, decode_image
from sept.data.samples import ShardStats, image_member, iter_samples
from sept.io import atomic_target

log = logging.getLogger(__name__)

MASK_EXT = "mask.png"
"""Member extension of a sample's label map."""
MAX_LABELS = 256
"""Labels fit a uint8 PNG; segments past the 255th share label 255."""
_REFERENCE_AREA = 224 * 224
_TAR_MTIME = 0.0  # fixed member times: the same input gives byte-identical shards


@dataclass(frozen=True)
class MaskParams:
    """Felzenszwalb–Huttenlocher parameters. ``scale`` and ``min_size`` None: scaled with the image
    area from DetCon's ImageNet setting (scale 1000 at 224 px) and area/64 pixels."""

    scale: float | None = None
    sigma: float = 0.8
    min_size: int | None = None

    def for_image(self, height: int, width: int) -> tuple[float, float, int]:
        area = height * width
        scale = self.scale if self.scale is not None else max(1.0, 1000.0 * area / _REFERENCE_AREA)
        min_size = self.min_size if self.min_size is not None else max(1, area // 64)
        return float(scale), float(self.sigma), int(min_size)


def felzenszwalb_labels(image: np.ndarray, params: MaskParams = MaskParams()) -> np.ndarray:
    """uint8 [H, W] segment labels 0 .. n-1 of an RGB uint8 [H, W, 3] image."""
    from skimage.segmentation import felzenszwalb

    scale, sigma, min_size = params.for_image(*image.shape[:2])
    labels = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1)
    return np.minimum(labels, MAX_LABELS - 1).astype(np.uint8)


def encode_mask(labels: np.ndarray) -> bytes:
    """PNG bytes (8-bit grayscale) of a uint8 label map."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """The uint8 [H, W] label map of ``mask.png`` bytes."""
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)


def _mask_member(job: tuple[bytes, MaskParams]) -> bytes | str:
    """PNG bytes of the mask of image bytes, or the reason the image cannot be used."""
    data, params = job
    try:
        image = np.asarray(decode_image(data))
    except BadSample as err:
        return str(err)
    return encode_mask(felzenszwalb_labels(image, params))


def has_masks(shards: Sequence[str]) -> bool:
    """Whether the first sample of the first shard carries a mask member."""
    with closing(iter_samples(shards[0], ShardStats())) as samples:
        for sample in samples:
            return MASK_EXT in sample.members
    return False


def masked_shard_path(out_dir: str, index: int, shard: str) -> str:
    """Where ``add_masks`` writes the copy of listing entry ``index`` (the index keeps names unique
    when shards of different directories share a base name)."""
    return os.path.join(out_dir, f"{index:06d}-{os.path.basename(shard)}")


def add_masks_to_shard(src: str, dst: str, pool, params: MaskParams = MaskParams(), chunksize: int = 16) -> ShardStats:
    """Writes ``dst``: ``src`` with a mask member added to every sample that has a decodable
    image (computed by ``pool``, any object with ``imap``); returns the read's stats with the
    undecodable samples recorded as bad."""
    stats = ShardStats()
    import webdataset as wds  # here, not at import: pool processes load this module and need none of it

    with closing(iter_samples(src, stats)) as samples_iter:
        samples = list(samples_iter)
    jobs = []
    for sample in samples:
        found = image_member(sample)
        jobs.append((found[1] if found else b"", params))
    with atomic_target(dst) as tmp:
        with wds.TarWriter(tmp, encoder=False, mtime=_TAR_MTIME) as writer:
            for sample, mask in zip(samples, pool.imap(_mask_member, jobs, chunksize=chunksize)):
                members = {ext: data for ext, data in sample.members.items() if ext != MASK_EXT}
                if isinstance(mask, bytes):
                    members[MASK_EXT] = mask
                else:
                    stats.add_bad(sample.key, mask or "no image member")
                writer.write({"__key__": sample.key, **members})
    return stats


def add_masks(
    shards: Sequence[str],
    out_dir: str,
    *,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    params: MaskParams = MaskParams(),
    by_name: bool = False,
) -> list[str]:
    """Masked copies of ``shards`` in ``out_dir`` (``masked_shard_path``), in listing order.

    ``by_name``: name each copy by its shard's base name alone, for shards whose names are unique
    (a selection's shared shards), so runs over other subsets of them find the same copies.

    This caller writes the shards at indices ``rank, rank + world_size, ...`` that do not exist
    yet, with ``workers`` processes (0: in this process); the others are left to the other
    ranks (wait for them before reading). Returns every output path.
    """
    os.makedirs(out_dir, exist_ok=True)
    outputs = [
        os.path.join(out_dir, os.path.basename(s)) if by_name else masked_shard_path(out_dir, i, s)
        for i, s in enumerate(shards)
    ]
    todo = [i for i in range(rank, len(shards), world_size) if not os.path.exists(outputs[i])]
    if not todo:
        return outputs
    if workers < 1:
        for i in todo:
            _report(shards[i], add_masks_to_shard(shards[i], outputs[i], _InProcess(), params))
        return outputs
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads or a process group
    with context.Pool(workers) as pool:
        for i in todo:
            _report(shards[i], add_masks_to_shard(shards[i], outputs[i], pool, params))
    return outputs


class _InProcess:
    """``imap`` in this process (``workers=0``: tiny data, where starting processes costs more)."""

    @staticmethod
    def imap(fn, jobs, chunksize: int = 1):
        return map(fn, jobs)


def _report(shard: str, stats: ShardStats) -> None:
    log.info("masks for %s: %d samples, %d without a mask", shard, stats.samples, stats.bad)
