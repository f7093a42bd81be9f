"""Stable global sample ids: one int64 packs a shard index (high bits) and a position within that shard.

The shard index is the shard's position in the pool listing (``sept.data.shards.list_shards``),
the position is the sample's order within its tar (``sept.data.samples.iter_samples``). Both are
fixed by the pool's files alone, so an id means the same sample in every stage and every run.
"""

from __future__ import annotations

import numpy as np

SHARD_BITS = 32
"""Bits reserved for the position within a shard; the shard index lives above them."""

MAX_POSITION = (1 << SHARD_BITS) - 1
# int64 ids must stay non-negative, so the shard index gets the remaining 31 bits.
MAX_SHARD_INDEX = (1 << (63 - SHARD_BITS)) - 1
_POSITION_MASK = np.int64(MAX_POSITION)


def make_ids(shard_index: int, positions: np.ndarray | list[int]) -> np.ndarray:
    """Ids of the samples at ``positions`` in shard number ``shard_index``, as an int64 array."""
    shard_index = int(shard_index)
    if not 0 <= shard_index <= MAX_SHARD_INDEX:
        raise ValueError(f"shard index {shard_index} outside [0, {MAX_SHARD_INDEX}]")
    positions = np.asarray(positions)
    if positions.size == 0:
        return np.zeros(positions.shape, dtype=np.int64)
    if not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    if positions.min() < 0 or positions.max() > MAX_POSITION:
        raise ValueError(f"positions must lie in [0, {MAX_POSITION}]")
    return (np.int64(shard_index) << np.int64(SHARD_BITS)) | positions.astype(np.int64)


def split_ids(ids: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``make_ids``: (shard indices, positions), both int64 arrays shaped like ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("sample ids are non-negative; got a negative id")
    return ids >> np.int64(SHARD_BITS), ids & _POSITION_MASK
