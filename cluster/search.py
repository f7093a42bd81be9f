"""Distributed search: searcher actors hold index shards, query batches stream to them, the coordinator merges.

The plan (``sept.index.search_plan``) gives every searcher a group of index shards that fits in
``memory_per_searcher``; when the groups outnumber the searchers they are searched in waves,
each searcher reloading its next group. Query batches go into Ray's object store once and
stream to every searcher, at most ``max_in_flight`` per searcher at a time. Each searcher
merges its own shards' top-k (``sept.index.merge.merge_topk``) and answers once per batch, so
the coordinator's work grows with the searchers, not with the shards; ``sept.index.merge.TopK``
folds the answers into the exact global top-k, whatever order they arrive in.

A searcher that dies (its process killed, its node lost), or that has not answered a batch in
``batch_timeout_s`` (a stalled read, a frozen node), is replaced by a new actor that loads the
same shards, and every batch it had not answered is sent again; the merge adds each (batch,
searcher) answer exactly once. After ``MAX_RESTARTS_PER_SEARCHER`` replacements the search
fails, naming the shards.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from tqdm import tqdm

from sept.errors import SeptError
from sept.index.merge import TopK, merge_topk
from sept.index.search_plan import plan_waves, shard_footprints
from sept.index.spec import parse_bytes
from sept.index.store import IndexStore

log = logging.getLogger(__name__)

DEFAULT_QUERY_BATCH = 1024
TIE_MARGIN = 8
"""Extra neighbours each shard returns beyond k. faiss keeps an arbitrary member of a group of equal
distances at its k-th place; with a few more, the merge can break such ties by id, so the result
is the monolithic top-k with ties broken by id, whatever the sharding."""
MAX_RESTARTS_PER_SEARCHER = 3
BATCH_TIMEOUT_S = 1800.0
"""A searcher with a batch unanswered this long is taken for stalled and replaced."""
_DEATH = (RayActorError, ActorDiedError, ActorUnavailableError)
_DEATH_OR_STALL = (*_DEATH, GetTimeoutError)  # a shard load that never returns counts as a death


@ray.remote(num_cpus=1, max_restarts=0)
class ShardSearcher:
    """Holds a group of index shards in memory and answers query batches with each shard's top-k."""

    def __init__(self, index_path: str, threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.store = IndexStore(index_path)
        self.metric = self.store.attrs["metric"]
        self.shards: dict[int, object] = {}

    def load(self, index_shards: list[int]) -> dict:
        """Load a group of shards, merged into one index where faiss can (IVF lists, flat id maps):
        a search then costs one coarse quantization and one scan per batch, however many small
        shards the group holds."""
        self.shards = {}
        gc.collect()  # free the previous wave's shards before reading the next ones
        merged = None
        for j in index_shards:
            index = self.store.load_shard(j)
            if merged is not None:
                try:
                    merged.merge_from(index, 0)
                    continue
                except RuntimeError:  # a kind faiss cannot merge: searched shard by shard
                    merged = None
            self.shards[j] = index
            if len(self.shards) == 1:
                merged = index
        return dict(
            pid=os.getpid(),
            node=socket.gethostname(),
            node_id=ray.get_runtime_context().get_node_id(),
            shards=list(index_shards),
        )

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-k over every shard this searcher holds, merged here."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        return merge_topk([index.search(xq, k) for _, index in sorted(self.shards.items())], k, metric=self.metric)


@dataclass
class SearchStats:
    """What a search did: filled in by ``search_index`` when passed one."""

    waves: list[list[list[int]]] = field(default_factory=list)
    group_bytes: list[list[int]] = field(default_factory=list)
    batches: int = 0
    restarts: int = 0
    searcher_pids: list[int] = field(default_factory=list)
    """Process ids of the searchers of the current wave, by searcher slot (updated on restarts)."""
    nodes: set[str] = field(default_factory=set)
    seconds: float = 0.0


def search_index(
    index_path: str,
    xq: np.ndarray,
    k: int,
    *,
    searchers: int | None = None,
    memory_per_searcher: int | str | None = None,
    batch_size: int = DEFAULT_QUERY_BATCH,
    max_in_flight: int = 2,
    batch_timeout_s: float = BATCH_TIMEOUT_S,
    stats: SearchStats | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    pool: SearcherPool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k (D, I) of every query over every index shard. Needs a Ray session.

    ``searchers`` defaults to one per index shard, at most the cluster's CPUs. ``on_batch(done,
    total)`` is called after each (searcher, batch) answer is merged. Pass a ``SearcherPool``
    to keep searchers and their shards loaded from one call to the next (when one wave holds
    every shard); it is then the caller's to close.
    """
    started = time.time()
    stats = stats if stats is not None else SearchStats()
    store = IndexStore.open(index_path)
    attrs = store.attrs
    metric = attrs["metric"]
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq = len(xq)
    if nq == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    memory = parse_bytes(memory_per_searcher)
    import faiss

    ivf = faiss.try_extract_index_ivf(store.trained_index()) is not None
    footprints = shard_footprints(store.path, store.nshards, ivf=ivf)
    trained_bytes = int(np.prod(_zarr_shape(store.path, "trained")))
    query_bytes = min(nq, batch_size) * xq.shape[1] * 4 * (max_in_flight + 1)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    plan = plan_waves(
        footprints, searchers or min(store.nshards, max(1, cpus)), memory, base=trained_bytes + query_bytes
    )
    _check_memory_fits(memory)
    stats.waves, stats.group_bytes = plan.waves, plan.group_bytes
    bounds = list(range(0, nq, batch_size)) + [nq]
    batches = [ray.put(xq[a:b]) for a, b in zip(bounds, bounds[1:])]
    stats.batches = len(batches)
    tops = [TopK(b - a, k, metric=metric) for a, b in zip(bounds, bounds[1:])]
    own_pool = pool is None
    if own_pool:
        pool = SearcherPool(store.path, memory)
    pool.stats = stats
    total = sum(len(w) for w in plan.waves) * len(batches)
    done = 0
    log.info(
        "search: %d queries in %d batches, k=%d, %d index shards on %d searchers in %d wave(s)",
        nq,
        len(batches),
        k,
        store.nshards,
        plan.searchers,
        len(plan.waves),
    )
    try:
        with tqdm(total=total, desc="search", unit="batch", disable=None) as bar:
            for wave_number, groups in enumerate(plan.waves):
                pool.load_wave(groups)
                todo = {s: deque(range(len(batches))) for s in range(len(groups))}
                inflight: dict[ray.ObjectRef, tuple[int, int, float]] = {}

                while inflight or any(todo.values()):
                    for s in range(len(groups)):
                        while todo[s] and sum(1 for v in inflight.values() if v[0] == s) < max_in_flight:
                            b = todo[s].popleft()
                            ref = pool.actors[s].search.remote(batches[b], k + TIE_MARGIN)
                            inflight[ref] = (s, b, time.monotonic())
                    oldest = min(v[2] for v in inflight.values())
                    wait_s = max(0.0, oldest + batch_timeout_s - time.monotonic())
                    ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_s)
                    if not ready:
                        now = time.monotonic()
                        for s in sorted({v[0] for v in inflight.values() if now - v[2] >= batch_timeout_s}):
                            _replace(pool, inflight, todo, groups, s, f"answered no batch in {batch_timeout_s:g}s")
                        continue
                    ref = ready[0]
                    s, b, _ = inflight[ref]
                    try:
                        D, I = ray.get(ref)
                    except _DEATH as err:
                        _replace(pool, inflight, todo, groups, s, f"died ({type(err).__name__})")
                        continue
                    del inflight[ref]
                    tops[b].add(D, I)  # k + TIE_MARGIN columns in, the best k kept
                    done += 1
                    bar.update(1)
                    if on_batch is not None:
                        on_batch(done, total)
                log.debug("search: wave %d of %d done", wave_number + 1, len(plan.waves))
    finally:
        if own_pool:
            pool.close()
    D = np.concatenate([t.D for t in tops])
    I = np.concatenate([t.I for t in tops])
    stats.seconds = time.time() - started
    return D, I


def _replace(pool: SearcherPool, inflight: dict, todo: dict, groups: list[list[int]], s: int, why: str) -> None:
    """Everything searcher s had not answered goes back on its queue; a new actor takes its shards."""
    lost = sorted(inflight.pop(r)[1] for r in [r for r, v in inflight.items() if v[0] == s])
    todo[s].extendleft(reversed(lost))
    log.warning("search: searcher %d (shards %s) %s; restarting it, redoing %d batch(es)", s, groups[s], why, len(lost))
    pool.restart(s, groups[s])


class SearcherPool:
    """The searcher actors, one per slot of a wave; replaces a dead one on the same shards.

    Kept across ``search_index`` calls, a pool whose searchers already hold a wave's shards does
    not load them again.
    """

    def __init__(self, index_path: str, memory_per_searcher: int | str | None = None):
        self.index_path = index_path
        self.options = dict(scheduling_strategy="SPREAD")
        memory = parse_bytes(memory_per_searcher)
        if memory is not None:
            self.options["memory"] = memory
        self.stats = SearchStats()
        self.actors: list = []
        self.loaded: list[list[int]] = []
        self.pids: list[int] = []
        self.restarts: dict[int, int] = {}
        self.timeout_s = BATCH_TIMEOUT_S  # for loading a group of shards

    def __enter__(self) -> SearcherPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _new(self):
        return ShardSearcher.options(**self.options).remote(self.index_path)

    def load_wave(self, groups: list[list[int]]) -> None:
        if groups == self.loaded and len(self.actors) == len(groups):
            self.stats.searcher_pids = list(self.pids)
            return
        while len(self.actors) < len(groups):
            self.actors.append(self._new())
        for extra in self.actors[len(groups) :]:
            ray.kill(extra)
        self.actors = self.actors[: len(groups)]
        self.stats.searcher_pids = [0] * len(groups)
        self.pids = [0] * len(groups)
        refs = [a.load.remote(g) for a, g in zip(self.actors, groups)]
        for s, ref in enumerate(refs):
            try:
                self._loaded(s, ray.get(ref, timeout=self.timeout_s))
            except _DEATH_OR_STALL:
                self.restart(s, groups[s])
        self.loaded = [list(g) for g in groups]

    def _loaded(self, s: int, info: dict) -> None:
        self.pids[s] = info["pid"]
        self.stats.searcher_pids[s] = info["pid"]
        self.stats.nodes.add(info["node_id"])

    def restart(self, s: int, shards: list[int]) -> None:
        while True:
            self.restarts[s] = self.restarts.get(s, 0) + 1
            self.stats.restarts += 1
            if self.restarts[s] > MAX_RESTARTS_PER_SEARCHER:
                raise SeptError(
                    f"{self.index_path}: the searcher of index shards {shards} failed "
                    f"{MAX_RESTARTS_PER_SEARCHER + 1} times (died or stalled); see the warnings above"
                )
            try:
                ray.kill(self.actors[s], no_restart=True)
            except Exception:  # already gone
                pass
            self.actors[s] = self._new()
            try:
                self._loaded(s, ray.get(self.actors[s].load.remote(shards), timeout=self.timeout_s))
                return
            except _DEATH_OR_STALL:
                continue

    def close(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors, self.loaded = [], []


def _zarr_shape(path: str, name: str) -> tuple[int, ...]:
    import zarr

    return tuple(zarr.open_group(path, mode="r")[name].shape)


def _check_memory_fits(memory: int | None) -> None:
    """A memory request larger than every node would leave the actor pending forever; refuse it."""
    if memory is None:
        return
    largest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest and memory > largest:
        raise SeptError(f"--memory-per-searcher {memory} bytes is more than any Ray node offers ({int(largest)} bytes)")
