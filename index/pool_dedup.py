"""Pool-wide duplicate rules, the math of ``sept dedup``: exact copies by content hash, near copies by
cosine within k-means clusters (the SemDeDup way). Numpy and faiss only; ``sept.cluster.dedup``
distributes it.

Exact: samples with equal image-bytes hashes form a group; the first in pool order (the smallest
id) stays. Near: within each cluster, members are visited nearest their centroid first (ties by
id); a member at least ``threshold`` similar to one already kept is removed in favour of the most
similar kept one, else it is kept. Every removed sample is thus directly similar to the one that
stands for it (no chains), and the pairs looked at are those within a cluster: O(n x cluster
size), never O(n^2).

A pair split by a cluster border would be missed, so a vector nearly as close to its second
centroid as to its first also visits that cluster as a *guest*: it is never removed there, but
its close pairs with the cluster's surviving members are reported (``NearCopies.border``), and
``resolve_border`` removes one of each such pair whose two samples both survived their own
clusters, never one that already stands for others.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    I, D = nearest_centroids(x, centroids, 1)
    return I[:, 0], D[:, 0]


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(clusters (n, k) int64, cosines (n, k) float32) of each row of x's k nearest centroids, best first;
    -1 and -inf pad rows when there are fewer than k centroids."""
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
    D, I = index.search(normalize(x), k)
    D = np.where(I < 0, -np.inf, D)
    return I.astype(np.int64), D.astype(np.float32)


@dataclass
class NearCopies:
    """The near rule's answer over some clusters: removed ids, the kept id standing for each and their
    cosine; and the border pairs (guest id, member id, cosine) for ``resolve_border``."""

    removed: np.ndarray
    kept: np.ndarray
    similarity: np.ndarray
    border: tuple[np.ndarray, np.ndarray, np.ndarray]


def near_copies(
    ids: np.ndarray,
    vectors: np.ndarray,
    cluster: np.ndarray,
    centroid_sim: np.ndarray,
    threshold: float,
    guest: np.ndarray | None = None,
) -> NearCopies:
    """The near rule, cluster by cluster, over the given rows; ``guest`` marks rows visiting a cluster
    that is not their own (compared with its survivors, never removed there)."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold is a cosine similarity in [-1, 1], got {threshold}")
    ids = np.asarray(ids, np.int64)
    guest = np.zeros(len(ids), bool) if guest is None else np.asarray(guest, bool)
    # Visiting order: by cluster, members before guests, nearest the centroid first, then by id.
    order = np.lexsort((ids, -np.asarray(centroid_sim, np.float64), guest, np.asarray(cluster)))
    ids, x, cluster, guest = ids[order], normalize(vectors[order]), np.asarray(cluster)[order], guest[order]
    bounds = np.flatnonzero(np.diff(cluster)) + 1
    out: list[list[np.ndarray]] = [[], [], [], [], [], []]
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(ids)]):
        m = a + int(np.count_nonzero(~guest[a:b]))  # members are rows a:m, guests m:b
        if m - a >= 2:
            r, k, s = _greedy(x[a:m], threshold)
            out[0].append(ids[a:m][r])
            out[1].append(ids[a:m][k])
            out[2].append(s)
            survivors = np.setdiff1d(np.arange(a, m), a + r)
        else:
            survivors = np.arange(a, m)
        for g0 in range(m, b if len(survivors) else m, DENSE_MEMBERS):  # guests a block at a time
            g1 = min(b, g0 + DENSE_MEMBERS)
            sim = x[g0:g1] @ x[survivors].T
            g, j = np.nonzero(sim >= threshold)
            out[3].append(ids[g0:g1][g])
            out[4].append(ids[survivors][j])
            out[5].append(sim[g, j])
    arrays = [np.concatenate(o) if o else np.zeros(0) for o in out]
    as_ids = [a.astype(np.int64) for a in (arrays[0], arrays[1], arrays[3], arrays[4])]
    return NearCopies(
        as_ids[0], as_ids[1], arrays[2].astype(np.float32), (as_ids[2], as_ids[3], arrays[5].astype(np.float32))
    )


def resolve_border(
    a: np.ndarray, b: np.ndarray, sims: np.ndarray, gone: np.ndarray, standing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removed, kept, similarity) from border pairs, most similar first: of a pair whose two samples are
    both still there (not in ``gone``), the later in pool order goes, unless it already stands for
    others (``standing``, or an earlier border pair), then the other does, unless it stands too."""
    live = ~(np.isin(a, gone) | np.isin(b, gone)) & (a != b)
    a, b, sims = a[live], b[live], sims[live]
    removed: dict[int, tuple[int, float]] = {}
    stands = set(np.asarray(standing, np.int64).tolist())
    for i in np.argsort(-sims, kind="stable"):
        first, later = sorted((int(a[i]), int(b[i])))
        if first in removed or later in removed:
            continue
        for go, stay in ((later, first), (first, later)):
            if go not in stands:
                removed[go] = (stay, float(sims[i]))
                stands.add(stay)
                break
    ids = np.fromiter(removed, np.int64, len(removed))
    kept = np.asarray([removed[i][0] for i in ids.tolist()], np.int64)
    return ids, kept, np.asarray([removed[i][1] for i in ids.tolist()], np.float32)


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
