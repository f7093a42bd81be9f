"""fill_budget: turn every target image's ranked neighbours into one deduplicated selection.

Math only, numpy in and out. SEPT's per-instance rule: every query gets an equal share of the
budget, filled from its own nearest neighbours in round-robin order (rank 0 of every query,
then rank 1, ...), so no image and no class dominates. A pool sample retrieved by several
queries is kept once, with its best score and every query that retrieved it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Selection:
    ids: np.ndarray  # (n,) int64 selected pool ids, in the order they were chosen
    scores: np.ndarray  # (n,) float32 best score of each selected id
    retrieved_by: list[list[int]] = field(default_factory=list)  # query rows that retrieved each id

    def __len__(self) -> int:
        return len(self.ids)


def fill_budget(D: np.ndarray, I: np.ndarray, budget: int, *, metric: str = "ip") -> Selection:
    """Round-robin over ranks: take each query's next unseen neighbour until the budget is full.

    D, I are (nq, k) search results sorted best first (as faiss returns them); ids < 0 are
    padding. Returns fewer than `budget` ids only when the results hold fewer distinct ids.
    """
    nq, k = I.shape
    better = np.greater if metric == "ip" else np.less
    chosen: dict[int, int] = {}  # id -> position in the output
    ids: list[int] = []
    scores: list[float] = []
    retrieved: list[set[int]] = []
    for rank in range(k):
        for q in range(nq):
            pid = int(I[q, rank])
            if pid < 0:
                continue
            score = float(D[q, rank])
            if pid in chosen:
                pos = chosen[pid]
                retrieved[pos].add(q)
                if better(score, scores[pos]):
                    scores[pos] = score
                continue
            if len(ids) >= budget:
                continue
            chosen[pid] = len(ids)
            ids.append(pid)
            scores.append(score)
            retrieved.append({q})
    return Selection(
        ids=np.asarray(ids, dtype=np.int64),
        scores=np.asarray(scores, dtype=np.float32),
        retrieved_by=[sorted(r) for r in retrieved],
    )


def neighbours_needed(budget: int, nq: int, ntotal: int, *, oversample: float = 2.0) -> int:
    """How many neighbours per query to fetch so that the round-robin can usually fill the budget."""
    share = -(-budget // max(1, nq))
    return int(min(ntotal, max(10, oversample * share)))
