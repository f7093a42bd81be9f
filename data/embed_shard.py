"""embed_shard: one pool shard in, its vectors, ids and bad-sample report out. No Ray here.

The encoder is any object with ``preprocess(PIL) -> Tensor`` and ``embed(Tensor) -> ndarray``
(sept.training.encoder.EncoderBundle). Bad samples are skipped and counted, never fatal.
"""

from __future__ import annotations

import numpy as np
import torch

from sept.data.decode import decode_sample
from sept.data.identity import make_ids
from sept.data.samples import ShardStats, iter_samples


def embed_shard(encoder, shard_path: str, shard_index: int, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, dict]:
    stats = ShardStats()
    vectors: list[np.ndarray] = []
    positions: list[int] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            vectors.append(encoder.embed(torch.stack(batch)))
            batch.clear()

    for sample in iter_samples(shard_path, stats):
        image = decode_sample(sample, stats)
        if image is None:
            continue
        batch.append(encoder.preprocess(image))
        positions.append(sample.position)
        if len(batch) >= batch_size:
            flush()
    flush()
    dim = int(encoder.dim)
    x = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    report = dict(samples=int(stats.samples), bad=int(stats.bad), bad_samples=[list(b) for b in stats.bad_samples[:1000]])
    return x, make_ids(shard_index, np.asarray(positions, dtype=np.int64)), report
