"""fill_budget: SEPT's per-instance rule on raw search results, and how many neighbours to fetch for it.

A thin face of ``sept.index.strategies`` for callers that hold faiss (D, I) in the index's own
metric: every query gets an equal share of the budget, filled from its own nearest neighbours
in round-robin order (rank 0 of every query, then rank 1, ...), so no image and no class
dominates. A pool sample retrieved by several queries is kept once, with its best score (in the
metric's own units) and every query that retrieved it.
"""

from __future__ import annotations

import numpy as np

from sept.index.strategies import Choice, choose

Selection = Choice  # the name earlier callers used


def fill_budget(D: np.ndarray, I: np.ndarray, budget: int, *, metric: str = "ip") -> Choice:
    """Round-robin over ranks: take each query's next unseen neighbour until the budget is full.

    D, I are (nq, k) search results sorted best first (as faiss returns them); ids < 0 are
    padding. Returns fewer than `budget` ids only when the results hold fewer distinct ids.
    Scores stay in the metric's units (similarity for ip, distance for l2).
    """
    D = np.asarray(D, dtype=np.float32)
    S = D.copy() if metric == "ip" else -D  # higher is better, order preserved
    S[np.asarray(I) < 0] = -np.inf
    choice = choose(S, np.asarray(I, dtype=np.int64), budget)
    if metric != "ip":
        choice.scores = -choice.scores
    return choice


def neighbours_needed(budget: int, nq: int, ntotal: int, *, oversample: float = 2.0) -> int:
    """How many neighbours per query to fetch so that the round-robin can usually fill the budget.

    ``nq`` is the number of queries sharing the budget evenly; with class balance, pass the
    smallest class's size times the number of classes (its images carry the largest shares).
    """
    share = -(-budget // max(1, nq))
    return int(min(ntotal, max(10, oversample * share)))


def round_k(k: int, ntotal: int) -> int:
    """``k`` rounded up to one of four steps an octave (8, 10, 12, 14, 16, 20, 24, 28, 32, ...), at
    most ``ntotal``: images whose k rounds alike are searched together, so a task with a k per
    class costs a few searches, never one per class, for at most a quarter more neighbours."""
    k = max(1, int(k))
    if k > 8:
        octave = 1 << (k.bit_length() - 1)
        k = next(step for step in (octave * m // 4 for m in (4, 5, 6, 7, 8)) if step >= k)
    return int(min(ntotal, k))
