"""Pool-wide duplicate rules, the math of ``sept dedup``: exact copies by content hash, near copies by
cosine within k-means clusters (the SemDeDup way). Numpy and faiss only; ``sept.cluster.dedup``
distributes it.

Exact: samples with equal image-bytes hashes form a group; the first in pool order (the smallest
id) stays. Near: within each cluster, members are visited nearest their centroid first (ties by
id); a member at least ``threshold`` similar to one already kept is removed in favour of the most
similar kept one, else it is kept. Every removed sample is thus directly similar to the one that
stands for it (no chains), and the pairs looked at are those within a cluster: O(n x cluster
size), never O(n^2). A pair split across two clusters is missed; the recall this costs is
measured in benchmarks/dedup_quality.py.
"""

from __future__ import annotations

import faiss
import numpy as np

from sept.index.dedup import close_pairs, normalize

DENSE_MEMBERS = 4096
"""Clusters up to this size compare all pairs with one matrix product; larger ones use faiss range search."""


def exact_copies(ids: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(removed, kept): every id whose (n, 2) hash equals a smaller id's, and that smallest id."""
    ids = np.asarray(ids, np.int64)
    hashes = np.asarray(hashes, np.uint64).reshape(len(ids), 2)
    if not len(ids):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((ids, hashes[:, 1], hashes[:, 0]))
    h = hashes[order]
    starts = np.ones(len(ids), bool)
    starts[1:] = np.any(h[1:] != h[:-1], axis=1)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(ids)), 0))
    sorted_ids = ids[order]
    dup = ~starts
    return sorted_ids[dup], sorted_ids[first[dup]]


def train_centroids(x: np.ndarray, n_clusters: int, *, seed: int = 0, gpu: bool = False, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids (n_clusters, dim) of the rows of x (normalised here)."""
    x = normalize(x)
    n_clusters = max(1, min(int(n_clusters), len(x)))
    km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, gpu=gpu, verbose=False)
    km.train(x)
    return normalize(km.centroids)


IVF_ASSIGN_FROM = 8192
"""From this many centroids on, a vector's centroid is found through an IVF over the centroids
(sqrt(C) lists, ``ASSIGN_NPROBE`` probed): O(sqrt(C)) comparisons a vector instead of C, so the
map round's cost grows with n, not n x C. Near copies, almost one vector, get one answer."""
ASSIGN_NPROBE = 16


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster (n,) int64, cosine to that centroid (n,) float32) of each row of x."""
    centroids = np.ascontiguousarray(centroids, np.float32)
    c, d = centroids.shape
    if c < IVF_ASSIGN_FROM:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(round(np.sqrt(c)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.train(centroids)
        index.nprobe = ASSIGN_NPROBE
    index.add(centroids)
    D, I = index.search(normalize(x), 1)
    return I[:, 0].astype(np.int64), D[:, 0].astype(np.float32)


def near_copies(
    ids: np.ndarray, vectors: np.ndarray, cluster: np.ndarray, centroid_sim: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removed, kept, similarity) by the near rule, cluster by cluster, over the given rows."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold is a cosine similarity in [-1, 1], got {threshold}")
    ids = np.asarray(ids, np.int64)
    # Visiting order: by cluster, then nearest the centroid first, then by id (a stable rule).
    order = np.lexsort((ids, -np.asarray(centroid_sim, np.float64), np.asarray(cluster)))
    ids, x, cluster = ids[order], normalize(vectors[order]), np.asarray(cluster)[order]
    bounds = np.flatnonzero(np.diff(cluster)) + 1
    removed, kept, sims = [], [], []
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(ids)]):
        if b - a < 2:
            continue
        r, k, s = _greedy(x[a:b], threshold)
        removed.append(ids[a:b][r])
        kept.append(ids[a:b][k])
        sims.append(s)
    if not removed:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(removed), np.concatenate(kept), np.concatenate(sims).astype(np.float32)


def _greedy(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (in visiting order) removed, the earlier kept row standing for each, and their cosine."""
    n = len(x)
    if n <= DENSE_MEMBERS:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        rows, cols = np.nonzero(sim >= threshold)
        lims = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=lims[1:])
        partners, values = cols.astype(np.int64), sim[rows, cols]
    else:
        lims, partners, values = close_pairs(x, threshold)
    is_kept = np.ones(n, bool)
    removed, kept, sims = [], [], []
    for i in np.flatnonzero(np.diff(lims)):  # only rows with a close partner can be removed
        p, v = partners[lims[i] : lims[i + 1]], values[lims[i] : lims[i + 1]]
        earlier = (p < i) & is_kept[p]
        if earlier.any():
            j = np.flatnonzero(earlier)[np.argmax(v[earlier])]
            is_kept[i] = False
            removed.append(i)
            kept.append(int(p[j]))
            sims.append(float(v[j]))
    return np.asarray(removed, np.int64), np.asarray(kept, np.int64), np.asarray(sims, np.float32)
