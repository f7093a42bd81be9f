"""Hierarchical k-means with resampling, and balanced sampling down its tree: the math of ``sept curate``.

After Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning"
(facebookresearch/ssl-data-curation: ``hierarchical_kmeans_with_resampling`` and
``hierarchical_sampling``). Plain k-means puts its centroids where the data is dense, so
sampling evenly over its clusters still over-samples the dense modes. Two things flatten it:

* levels: level 1 clusters the points into ``k_1`` clusters, level ``l`` clusters the centroids of
  level ``l - 1`` into ``k_l``; the top level's few clusters stand for broad concepts;
* resampling: after each k-means of a level, the ``r`` members of every cluster nearest its
  centroid are drawn and k-means runs again on their union (from fresh seeds: started from the
  current centroids it stays where it is), so a
  dense mode weighs as much as any cluster's ``r`` points, not as its count; ``steps`` times.

Sampling then gives every top-level cluster an equal share of the requested count (water-filling:
a cluster smaller than its share gives all it has, the rest is shared by the others), splits each
cluster's share over its children the same way, level by level, and takes a level-1 cluster's
share at random (or nearest its centroid) among its members.

Numpy in, numpy out: nothing here reads files or knows of Ray. Levels are listed finest first
(``clusters[0]`` is ``k_1``); vectors are expected L2-normalised, distances are squared L2.
Every result is deterministic for its seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

SAMPLINGS = ("random", "closest")
PLUSPLUS_WORK = 1 << 24  # n * k under which k-means starts from k-means++ seeds (seconds of numpy)
ASSIGN_BATCH = 65536  # rows per search against the centroids: memory is one batch's distances


@dataclass
class Hierarchy:
    """The tree: ``centroids[l]`` (k_{l+1}, d) per level, finest first, and ``parents[l]`` (k_{l+1},),
    the level-(l+2) cluster each level-(l+1) cluster belongs to (one array fewer than levels)."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray]

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.centroids]

    def top_of(self, level1: np.ndarray) -> np.ndarray:
        """The top-level cluster of each level-1 cluster in ``level1``."""
        out = np.asarray(level1, np.int64)
        for parent in self.parents:
            out = parent[out]
        return out


def default_levels(n: int) -> list[int]:
    """Clusters per level for ``n`` points, finest first: about 10 points a level-1 cluster, then a
    seventh at each level above while that leaves at least 3 clusters, at most 4 levels (290 points:
    29, 4; 1,200: 120, 17; a million: 100,000, 14,285, 2,040, 291). Chosen on the demo corpus by
    benchmarks/curate_balance.py: level-1 clusters of ~20 points balanced worse than ~10."""
    levels = [max(1, round(n / 10))]
    while len(levels) < 4 and levels[-1] // 7 >= 3:
        levels.append(levels[-1] // 7)
    return levels


def check_levels(clusters: list[int], n: int, flag: str = "--clusters") -> None:
    """Raise ValueError (one line, naming ``flag``) unless every level has at least 1 cluster and at
    most as many as the level below has points (level 1: the ``n`` points)."""
    if not clusters:
        raise ValueError(f"{flag} names no level")
    below, what = n, "points"
    for level, k in enumerate(clusters, start=1):
        if k < 1:
            raise ValueError(f"{flag}: level {level} asks for {k} clusters; each level needs at least 1")
        if k > below:
            raise ValueError(f"{flag}: level {level} asks for {k} clusters of only {below} {what}")
        below, what = k, f"level-{level} centroids"


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, niter: int = 20, gpu: bool = False, init: np.ndarray | None = None
) -> np.ndarray:
    """Centroids (k, d), float32, of faiss's k-means on every row of ``x`` (no subsampling), started
    from ``init``, else from k-means++ seeds when that is cheap (n * k <= PLUSPLUS_WORK), else
    from faiss's random rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if init is None and len(x) * k <= PLUSPLUS_WORK:
        init = kmeans_plusplus(x, k, seed=seed)
    km = faiss.Kmeans(
        x.shape[1],
        int(k),
        niter=niter,
        seed=seed,
        gpu=gpu,
        verbose=False,
        min_points_per_centroid=1,  # small clusters are the point of a balanced curation: no warning
        max_points_per_centroid=-(-len(x) // int(k)) + 1,  # every row, never faiss's own subsample
    )
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def kmeans_plusplus(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """k seeds drawn by k-means++ (each next one with probability ~ squared distance to the nearest so far)."""
    rng = np.random.default_rng(seed)
    norms = (x.astype(np.float64) ** 2).sum(1)
    seeds = [int(rng.integers(len(x)))]
    nearest = np.full(len(x), np.inf)
    for _ in range(k):
        # one matrix-vector product a seed: |x - c|^2 = |x|^2 + |c|^2 - 2 x.c
        nearest = np.maximum(np.minimum(nearest, norms + norms[seeds[-1]] - 2.0 * (x @ x[seeds[-1]])), 0.0)
        if len(seeds) == k:
            break
        total = nearest.sum()
        seeds.append(int(rng.choice(len(x), p=nearest / total)) if total > 0 else int(rng.integers(len(x))))
    return x[seeds].copy()


def flat_index(centroids: np.ndarray, gpu: bool):
    """An exact L2 index over the centroids (on every GPU with ``gpu``), to assign points batch by batch."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def assign(x: np.ndarray, centroids: np.ndarray, *, gpu: bool = False, index=None) -> tuple[np.ndarray, np.ndarray]:
    """(D, I): each row's squared distance to its nearest centroid and that centroid's index (int64)."""
    index = index or flat_index(centroids, gpu)
    D = np.empty(len(x), np.float32)
    I = np.empty(len(x), np.int64)
    for i0 in range(0, len(x), ASSIGN_BATCH):
        d, i = index.search(np.ascontiguousarray(x[i0 : i0 + ASSIGN_BATCH], dtype=np.float32), 1)
        D[i0 : i0 + len(d)], I[i0 : i0 + len(i)] = d[:, 0], i[:, 0]
    return D, I


def _nearest_members(D: np.ndarray, I: np.ndarray, r: int) -> np.ndarray:
    """Row indices of the ``r`` members of every cluster nearest its centroid (fewer if it has fewer)."""
    order = np.lexsort((np.arange(len(I)), D, I))  # by cluster, then distance; ties by row
    labels = I[order]
    starts = np.searchsorted(labels, labels, side="left")
    return np.sort(order[np.arange(len(order)) - starts < r])


def kmeans_with_resampling(
    x: np.ndarray, k: int, *, steps: int, sample_size: int, seed: int = 0, niter: int = 20, gpu: bool = False
) -> np.ndarray:
    """Centroids (k, d) of k-means on ``x``, then ``steps`` times of k-means (from fresh seeds) on the
    ``sample_size`` members of each cluster nearest its centroid."""
    centroids = kmeans(x, k, seed=seed, niter=niter, gpu=gpu)
    if sample_size < 1 or steps < 1:
        return centroids
    for step in range(steps):
        D, I = assign(x, centroids, gpu=gpu)
        picked = x[_nearest_members(D, I, sample_size)]
        if len(picked) < k:  # too few to hold k clusters (every cluster tiny): nothing to spread
            break
        centroids = kmeans(picked, k, seed=seed + 1 + step, niter=niter, gpu=gpu)
    return centroids


def hierarchical_kmeans(
    x: np.ndarray,
    clusters: list[int],
    *,
    steps: int | list[int] = 10,
    sample_sizes: list[int] | None = None,
    seed: int = 0,
    niter: int = 20,
    gpu: bool = False,
    progress: bool = True,
) -> Hierarchy:
    """The tree of ``clusters`` (k per level, finest first) over the rows of ``x``.

    ``steps`` (one for all levels, or one per level) resampling steps with ``sample_sizes[l]``
    points per cluster at level l (default: half the level's mean cluster size, as the reference
    configs do). Raises ValueError if a level asks for more clusters than it has points.
    """
    check_levels(clusters, len(x))
    steps = [steps] * len(clusters) if isinstance(steps, int) else list(steps)
    sample_sizes = sample_sizes or default_sample_sizes(clusters, len(x))
    if len(steps) != len(clusters) or len(sample_sizes) != len(clusters):
        raise ValueError(f"{len(clusters)} levels need as many resampling steps and sample sizes")
    centroids: list[np.ndarray] = []
    parents: list[np.ndarray] = []
    points = np.ascontiguousarray(x, dtype=np.float32)
    for level, k in enumerate(tqdm(clusters, desc="hierarchical k-means", unit="level", disable=not progress or None)):
        c = kmeans_with_resampling(
            points,
            k,
            steps=steps[level],
            sample_size=sample_sizes[level],
            seed=seed + 1000 * level,
            niter=niter,
            gpu=gpu,
        )
        if centroids:
            parents.append(assign(points, c, gpu=gpu)[1])
        log.info("hierarchical k-means: level %d, %d clusters of %d points", level + 1, k, len(points))
        centroids.append(c)
        points = c
    return Hierarchy(centroids, parents)


def default_sample_sizes(clusters: list[int], n: int) -> list[int]:
    """Per level, half its mean cluster size (at least 1)."""
    below = [n] + list(clusters[:-1])
    return [max(1, below[i] // clusters[i] // 2) for i in range(len(clusters))]


def water_fill(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Counts per cluster summing to min(n, sizes.sum()), none above its size, as equal as they can
    be: the largest level t with sum(min(sizes, t)) <= n, and the remainder one each to clusters
    drawn at random among those holding more than t."""
    sizes = np.asarray(sizes, np.int64)
    if n >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # sum(min(sizes, lo)) <= n < sum(min(sizes, hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= n:
            lo = mid
        else:
            hi = mid
    counts = np.minimum(sizes, lo)
    remainder = int(n - counts.sum())
    if remainder:
        counts[rng.choice(np.flatnonzero(sizes > lo), remainder, replace=False)] += 1
    return counts


def level_counts(level1: np.ndarray, hierarchy: Hierarchy) -> list[np.ndarray]:
    """Members per cluster at every level (finest first), from each point's level-1 cluster (-1: skipped)."""
    counts = [np.bincount(level1[level1 >= 0], minlength=hierarchy.sizes[0]).astype(np.int64)]
    for parent, k in zip(hierarchy.parents, hierarchy.sizes[1:]):
        counts.append(np.bincount(parent, weights=counts[-1], minlength=k).astype(np.int64))
    return counts


def quotas(level1: np.ndarray, hierarchy: Hierarchy, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """How many points each cluster of every level gives (finest first): water-filled over the top
    level, then over each cluster's children within its share, down to level 1."""
    counts = level_counts(level1, hierarchy)
    share = [np.zeros(0, np.int64)] * hierarchy.levels
    share[-1] = water_fill(counts[-1], n, rng)
    for level in range(hierarchy.levels - 2, -1, -1):
        parent = hierarchy.parents[level]
        out = np.zeros(len(parent), np.int64)
        order = np.argsort(parent, kind="stable")
        bounds = np.searchsorted(parent[order], np.arange(len(counts[level + 1]) + 1))
        for p in np.flatnonzero(share[level + 1]):
            children = order[bounds[p] : bounds[p + 1]]
            out[children] = water_fill(counts[level][children], int(share[level + 1][p]), rng)
        share[level] = out
    return share


def balanced_sample(
    level1: np.ndarray,
    hierarchy: Hierarchy,
    n: int,
    *,
    distances: np.ndarray | None = None,
    sampling: str = "random",
    seed: int = 0,
) -> np.ndarray:
    """Indices (ascending) of min(n, points) points, balanced over the tree from the top level down.

    ``level1`` is each point's level-1 cluster (-1 for a point left out); within a level-1 cluster
    ``sampling`` "random" draws its share at random, "closest" takes the members nearest its
    centroid (by ``distances``).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling {sampling!r} is unknown; use one of {', '.join(SAMPLINGS)}")
    level1 = np.asarray(level1, np.int64)
    rng = np.random.default_rng(seed)
    share = quotas(level1, hierarchy, n, rng)[0]
    if sampling == "closest":
        if distances is None:
            raise ValueError("closest sampling needs each point's distance to its centroid")
        key = np.asarray(distances, np.float64)
    else:
        key = rng.random(len(level1))
    rows = np.flatnonzero(level1 >= 0)
    order = rows[np.lexsort((rows, key[rows], level1[rows]))]  # by cluster, then key; ties by row
    labels = level1[order]
    rank = np.arange(len(order)) - np.searchsorted(labels, labels, side="left")
    return np.sort(order[rank < share[labels]])
