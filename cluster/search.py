"""Distributed search: searcher actors each hold index shards, the coordinator merges exactly.

Queries go into Ray's object store once; every searcher answers with its shards' top-k, and
``merge_topk`` (a faiss.ResultHeap) turns those into the global top-k.
"""

from __future__ import annotations

import logging

import numpy as np
import ray

from sept.index.merge import merge_topk
from sept.index.store import IndexStore

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
class ShardSearcher:
    def __init__(self, index_path: str, index_shards: list[int]):
        import faiss

        faiss.omp_set_num_threads(1)
        store = IndexStore(index_path)
        self.shards = {j: store.load_shard(j) for j in index_shards}

    def search(self, xq: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [index.search(np.ascontiguousarray(xq, dtype=np.float32), k) for index in self.shards.values()]


def search_index(index_path: str, xq: np.ndarray, k: int, *, searchers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k (D, I) of every query over every index shard. Needs a Ray session."""
    store = IndexStore.open(index_path)
    nshards = store.nshards
    n_actors = max(1, min(searchers or nshards, nshards))
    groups = [list(range(j, nshards, n_actors)) for j in range(n_actors)]
    actors = [ShardSearcher.options(scheduling_strategy="SPREAD").remote(store.path, g) for g in groups]
    xq_ref = ray.put(np.ascontiguousarray(xq, dtype=np.float32))
    try:
        results = [r for part in ray.get([a.search.remote(xq_ref, k) for a in actors]) for r in part]
    finally:
        for actor in actors:
            ray.kill(actor)
    return merge_topk(results, k, metric=store.attrs["metric"])
