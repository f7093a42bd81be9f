"""Which searcher holds which index shards, and in how many waves: a memory-bounded plan. No Ray.

A searcher holds a group of index shards in memory at once. When every shard fits on the
available searchers, there is one wave; otherwise the shards are packed into groups no larger
than the memory a searcher may use, and the groups are searched ``searchers`` at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import zarr

from sept.errors import SeptError

# faiss's IndexIDMap2 (non-IVF shards) keeps an id -> row hash map beside the codes, a little
# under this many bytes a vector (benchmarks/RESULTS.md). IVF lists hold just the code and the id.
_IDMAP_BYTES_PER_VECTOR = 48


@dataclass(frozen=True)
class ShardFootprint:
    """Memory of one loaded index shard: what stays resident, and the extra while loading it."""

    resident: int
    loading: int  # the numpy copies of ids and codes that exist until faiss holds them


def shard_footprints(index_path: str, nshards: int, *, ivf: bool) -> list[ShardFootprint]:
    """Estimated footprint of every index shard, from array shapes alone (no data read)."""
    out = []
    for j in range(nshards):
        group = zarr.open_group(os.path.join(index_path, "shards", f"{j:05d}"), mode="r")
        n, code_size = group["codes"].shape
        raw = n * (code_size + 8)
        out.append(ShardFootprint(resident=raw + (0 if ivf else n * _IDMAP_BYTES_PER_VECTOR), loading=raw))
    return out


@dataclass
class SearchPlan:
    waves: list[list[list[int]]]
    """wave -> searcher -> index shards it holds during that wave."""
    group_bytes: list[list[int]]
    """wave -> searcher -> estimated peak bytes of its shard group."""

    @property
    def searchers(self) -> int:
        return max(len(w) for w in self.waves)


def group_peak(shards: list[int], footprints: list[ShardFootprint], base: int) -> int:
    """Peak memory of a searcher that loads ``shards`` one after another: all resident + the largest load."""
    if not shards:
        return base
    return base + sum(footprints[j].resident for j in shards) + max(footprints[j].loading for j in shards)


def plan_waves(
    footprints: list[ShardFootprint], searchers: int, memory_per_searcher: int | None = None, *, base: int = 0
) -> SearchPlan:
    """Assign index shards to searchers, in as few waves as memory allows.

    ``base`` is what a searcher needs besides its shards (the trained quantizer, the queries).
    With no memory limit, or when an even split over ``searchers`` fits, everything is one wave;
    else shards are packed first-fit-decreasing into groups that fit, ``searchers`` per wave.
    Raises ``SeptError`` when one shard alone does not fit.
    """
    n = len(footprints)
    if n == 0:
        raise ValueError("no index shards to plan")
    searchers = max(1, min(int(searchers), n))
    order = sorted(range(n), key=lambda j: (-footprints[j].resident, j))  # largest first, stable
    if memory_per_searcher is not None:
        for j in order:
            need = group_peak([j], footprints, base)
            if need > memory_per_searcher:
                raise SeptError(
                    f"index shard {j} needs about {_mb(need)} in a searcher but --memory-per-searcher is "
                    f"{_mb(memory_per_searcher)}; raise it or build the index with more --shards"
                )
    # Longest-processing-time split over all searchers: balanced work, one wave.
    groups: list[list[int]] = [[] for _ in range(searchers)]
    loads = [0] * searchers
    for j in order:
        s = min(range(searchers), key=lambda s: (loads[s], s))
        groups[s].append(j)
        loads[s] += footprints[j].resident
    if memory_per_searcher is None or all(group_peak(g, footprints, base) <= memory_per_searcher for g in groups):
        groups = [sorted(g) for g in groups if g]
        return SearchPlan(waves=[groups], group_bytes=[[group_peak(g, footprints, base) for g in groups]])
    # First-fit decreasing into bins of the allowed size; then `searchers` bins per wave.
    bins: list[list[int]] = []
    for j in order:
        for b in bins:
            if group_peak(b + [j], footprints, base) <= memory_per_searcher:
                b.append(j)
                break
        else:
            bins.append([j])
    bins = [sorted(b) for b in bins]
    waves = [bins[w : w + searchers] for w in range(0, len(bins), searchers)]
    return SearchPlan(waves=waves, group_bytes=[[group_peak(g, footprints, base) for g in w] for w in waves])


def _mb(nbytes: int) -> str:
    if nbytes < 1 << 20:
        return f"{nbytes} bytes"
    return f"{math.ceil(nbytes / (1 << 20))} MiB"
