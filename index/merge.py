"""Exact top-k merge: per-shard top-k results in, the global top-k out. Numpy only.

The same (D, I) convention as faiss: D float32, I int64, both (nq, k), best first, padding as
id -1. Inner product keeps the largest scores and L2 the smallest: getting that direction wrong
for one metric is the classic bug.

Equal scores are ordered by id (smaller first). faiss itself leaves the order of ties to the
order it happened to scan vectors in; breaking them by id makes the merge independent of how
shards were grouped onto searchers, of the order results arrived in, and of restarts, so the
same index and queries always give the same bytes. The merged result equals a monolithic index
over the same codes: same ids, distances and order, ties broken by id. (When a group of equal
distances straddles the k-th place, faiss keeps an arbitrary member of it; asking every shard,
and the monolithic reference, for a few more than k before cutting makes the choice the id's.)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_PAD_ID = np.iinfo(np.int64).max  # sorts after every real id


def worst_score(metric: str) -> float:
    """The padding distance of a missing result: it loses against every real one."""
    return -np.inf if metric == "ip" else np.inf


def _check_metric(metric: str) -> None:
    if metric not in ("ip", "l2"):
        raise ValueError(f"unknown metric {metric!r}; expected 'ip' or 'l2'")


def _merge_two(D: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (D, I), any width, reduced to their k best columns in canonical order."""
    D = np.asarray(D, dtype=np.float32)
    I = np.asarray(I, dtype=np.int64)
    missing = I < 0
    primary = np.where(missing, np.inf, -D if metric == "ip" else D)
    primary = np.where(np.isnan(primary), np.inf, primary)  # a NaN distance never wins
    secondary = np.where(missing, _PAD_ID, I)
    order = np.lexsort((secondary, primary), axis=1)[:, :k]
    D_out = np.take_along_axis(D, order, axis=1)
    I_out = np.take_along_axis(I, order, axis=1)
    pad = I_out < 0
    if pad.any():
        D_out[pad] = worst_score(metric)
        I_out[pad] = -1
    if D_out.shape[1] < k:  # fewer candidates than k in total: pad like faiss does
        extra = k - D_out.shape[1]
        D_out = np.hstack([D_out, np.full((len(D_out), extra), worst_score(metric), np.float32)])
        I_out = np.hstack([I_out, np.full((len(I_out), extra), -1, np.int64)])
    return D_out, I_out


class TopK:
    """A running exact top-k over results that arrive one shard (or one shard group) at a time.

    ``add`` any number of (D, I) blocks of shape (nq, k_s); ``result`` is the top k of all of
    them, whatever the order of the adds. A block must not repeat an id already added for the
    same query (each id lives in exactly one index shard).
    """

    def __init__(self, nq: int, k: int, *, metric: str = "ip"):
        _check_metric(metric)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.nq, self.k, self.metric = int(nq), int(k), metric
        self.D = np.full((self.nq, self.k), worst_score(metric), np.float32)
        self.I = np.full((self.nq, self.k), -1, np.int64)
        self.blocks = 0

    def add(self, D: np.ndarray, I: np.ndarray) -> None:
        if D.shape != I.shape or D.ndim != 2 or D.shape[0] != self.nq:
            raise ValueError(f"expected (D, I) of shape ({self.nq}, k_s); got {D.shape} and {I.shape}")
        self.D, self.I = _merge_two(np.hstack([self.D, D]), np.hstack([self.I, I]), self.k, self.metric)
        self.blocks += 1

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.D.copy(), self.I.copy()


def merge_topk(
    results: Iterable[tuple[np.ndarray, np.ndarray]], k: int, *, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Merge shard results [(D_s, I_s), ...], each (nq, k_s), into the global (D, I) of shape (nq, k).

    Ids of -1 (a shard with fewer than k vectors) never displace real results. Rows are sorted
    best first, ties by id.
    """
    results = list(results)
    if not results:
        raise ValueError("merge_topk needs at least one shard result")
    _check_metric(metric)
    D = np.hstack([np.asarray(d, dtype=np.float32) for d, _ in results])
    I = np.hstack([np.asarray(i, dtype=np.int64) for _, i in results])
    return _merge_two(D, I, k, metric)


def canonical_order(D: np.ndarray, I: np.ndarray, *, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """(D, I) rows re-sorted into the merge's order (best first, ties by id), same width."""
    return _merge_two(D, I, D.shape[1], metric)
