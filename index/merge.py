"""merge_topk: the exact merge of per-shard top-k results into the global top-k.

Numpy in, numpy out, the same (D, I) convention as faiss. Inner product keeps the largest
scores and L2 the smallest: getting that direction wrong for one metric is the classic bug.
"""

from __future__ import annotations

from typing import Iterable

import faiss
import numpy as np


def merge_topk(results: Iterable[tuple[np.ndarray, np.ndarray]], k: int, *, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Merge shard results [(D_s, I_s), ...], each (nq, k_s), into the global (D, I) of shape (nq, k).

    Ids of -1 (a shard with fewer than k vectors) never displace real results. Output rows
    are sorted best first.
    """
    heap = None
    for D, I in results:
        if heap is None:
            heap = faiss.ResultHeap(D.shape[0], k, keep_max=(metric == "ip"))
        D = np.array(D, dtype=np.float32)
        # faiss pads missing results with -1 ids and +-inf / +-FLT_MAX distances; make them lose
        D[I < 0] = -np.inf if metric == "ip" else np.inf
        heap.add_result(D, I)
    if heap is None:
        raise ValueError("merge_topk needs at least one shard result")
    heap.finalize()
    return heap.D, heap.I
