"""Random numbers keyed by the sample they are for: numpy in, numpy out.

A view of a sample must depend on the run's seed, the epoch and the sample alone, never on the
batch, the worker or the rank that makes it (so a resumed epoch repeats its views exactly).
Seeding a generator per sample made that true at tens of microseconds a sample; here every
number is a counter-based hash (splitmix64's finaliser) of the sample's key and the number's
column, so a whole batch's draws are a few array operations.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    z = z.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def sample_keys(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """uint64 [N] keys of the samples ``ids`` (int64 sample ids) in ``epoch`` of a run seeded ``seed``."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64) + _GOLDEN)
        base = _mix(base ^ np.uint64(epoch & (2**64 - 1)))
        return _mix(base ^ np.asarray(ids, dtype=np.int64).astype(np.uint64))


def keyed_uniforms(keys: np.ndarray, count: int, stream: int = 0) -> np.ndarray:
    """float64 [N, count] in [0, 1): column c of row n depends on ``keys[n]``, ``stream`` and c only
    (separate ``stream``s give independent numbers for separate uses)."""
    keys = np.asarray(keys, dtype=np.uint64)
    columns = np.arange(count, dtype=np.uint64) + np.uint64(stream) * np.uint64(1 << 32) + np.uint64(1)
    with np.errstate(over="ignore"):
        bits = _mix(keys[:, None] + columns[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
