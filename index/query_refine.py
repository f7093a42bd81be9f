"""Selection refinements that use the target better than one query per image: pure numpy.

SEPT retrieves per instance: every target image is a query with an equal share of the budget
(``sept.index.budget.fill_budget``). The functions here change the queries or the ranking that
round-robin consumes, each on its own so the select stage can put each behind a flag:

* ``class_prototypes``: the normalised mean of each class's queries, a query alongside the
  instances (a class seen from many images is less noisy than any one of them);
* ``cluster_prototypes``: the same without labels, centroids of a spherical k-means of the queries;
* ``expand_queries``: average query expansion (AQE, Chum et al. 2007; alpha-QE of Radenovic
  et al. 2018): each query averaged with its top pool neighbours, weighted by similarity^alpha;
* ``k_reciprocal_rerank``: candidates a query would also be a k-nearest neighbour of come first
  (the reciprocity test of Qin et al. 2011 / Zhong et al. 2017, done with one number per
  candidate: its similarity to its k-th nearest pool neighbour);
* ``mix_streams`` (defined in ``sept.index.strategies``, which uses it for ``--topk-share``): a
  budget shared between strategies (e.g. per-instance and cluster streams) in given fractions.

Vectors are L2-normalised float32 rows and scores are inner products (cosine similarity);
ids < 0 in search results are padding, as faiss returns them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sept.index.strategies import Stream, mix_streams  # noqa: F401 (re-exported)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def class_prototypes(xq: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(prototypes (C, d), their class labels (C,)): the normalised mean query of each class
    present in ``labels``, classes in increasing order."""
    labels = np.asarray(labels)
    if len(labels) != len(xq):
        raise ValueError(f"{len(labels)} labels for {len(xq)} queries")
    classes = np.unique(labels)
    protos = np.stack([np.asarray(xq, dtype=np.float32)[labels == c].mean(axis=0) for c in classes])
    return _normalise(protos), classes


def cluster_prototypes(xq: np.ndarray, n_clusters: int, *, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Centroids (n, d) of a spherical k-means of the queries (cosine assignment, normalised
    means), for targets without labels; ``n`` is at most the number of distinct queries."""
    x = _normalise(xq)
    n_clusters = int(min(max(1, n_clusters), len(np.unique(x, axis=0))))
    rng = np.random.default_rng(seed)
    # k-means++ seeding on cosine distance keeps the start spread out.
    centroids = [x[int(rng.integers(len(x)))]]
    for _ in range(1, n_clusters):
        dist = np.clip(1.0 - (x @ np.stack(centroids).T).max(axis=1), 0.0, None)
        p = dist / dist.sum() if dist.sum() > 0 else np.full(len(x), 1.0 / len(x))
        centroids.append(x[int(rng.choice(len(x), p=p))])
    c = np.stack(centroids)
    for _ in range(iters):
        assign = (x @ c.T).argmax(axis=1)
        new = np.stack([x[assign == j].mean(axis=0) if np.any(assign == j) else c[j] for j in range(len(c))])
        new = _normalise(new)
        if np.allclose(new, c):
            break
        c = new
    return c


def expand_queries(
    xq: np.ndarray, neighbour_vectors: np.ndarray, neighbour_scores: np.ndarray, *, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE: each query plus its top pool neighbours, weighted by max(score, 0)^alpha, renormalised.

    ``neighbour_vectors`` (nq, k, d) and ``neighbour_scores`` (nq, k) are each query's first k
    search results (k of 1-5 is usual; padded slots should carry score <= 0). The query itself
    has weight 1; ``alpha = 0`` is plain average query expansion."""
    xq = np.asarray(xq, dtype=np.float32)
    vectors = np.asarray(neighbour_vectors, dtype=np.float32)
    scores = np.asarray(neighbour_scores, dtype=np.float32)
    if vectors.shape[:2] != scores.shape or vectors.shape[0] != xq.shape[0] or vectors.shape[2] != xq.shape[1]:
        raise ValueError(f"neighbours {vectors.shape} and scores {scores.shape} do not fit queries {xq.shape}")
    weights = np.clip(scores, 0.0, None) ** alpha if alpha > 0 else (scores > 0).astype(np.float32)
    expanded = xq + np.einsum("qk,qkd->qd", weights, vectors)
    return _normalise(expanded)


def k_reciprocal_rerank(
    D: np.ndarray, I: np.ndarray, kth_similarity: np.ndarray, *, weight: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Re-orders each query's candidates by ``score - weight * kth_similarity[candidate]``.

    ``kth_similarity`` has one value per slot of ``I`` (same shape): the candidate's similarity
    to its own k-th nearest pool neighbour (itself not counted). A query scoring at least that
    would be among the candidate's k nearest neighbours, i.e. the pair is k-reciprocal, so with
    ``weight = 1`` every k-reciprocal candidate (adjusted score >= 0) ranks above every other;
    candidates in crowded regions of the pool (hubs, near to everything) are pushed down.
    Returns (adjusted scores, ids) sorted best first; padding (id < 0) stays last."""
    D = np.asarray(D, dtype=np.float32)
    I = np.asarray(I, dtype=np.int64)
    kth = np.asarray(kth_similarity, dtype=np.float32)
    if D.shape != I.shape or kth.shape != I.shape:
        raise ValueError(f"D {D.shape}, I {I.shape} and kth_similarity {kth.shape} must have one shape")
    adjusted = D - np.float32(weight) * kth
    adjusted = np.where(I < 0, -np.inf, adjusted)
    order = np.argsort(-adjusted, axis=1, kind="stable")
    return np.take_along_axis(adjusted, order, axis=1), np.take_along_axis(I, order, axis=1)


def kth_neighbour_similarity(D_self: np.ndarray, k: int) -> np.ndarray:
    """Each row's similarity to its k-th nearest neighbour from a search of the pool with its own
    vectors (``D_self`` sorted best first, column 0 the vector itself): ``D_self[:, k]``."""
    D_self = np.asarray(D_self, dtype=np.float32)
    if not 1 <= k < D_self.shape[1]:
        raise ValueError(f"k must lie in [1, {D_self.shape[1] - 1}] for {D_self.shape[1]} neighbours, got {k}")
    return D_self[:, k]
