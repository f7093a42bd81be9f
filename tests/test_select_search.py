"""Distributed search on the real two-node Ray cluster: equal to one monolithic index, searched in
waves when the shards do not fit the searchers' memory, and robust to a searcher killed mid-run."""

from __future__ import annotations

import os
import signal

import faiss
import numpy as np
import pytest
import ray

from sept.cluster.search import TIE_MARGIN, SearchStats, search_index
from sept.index.codes import encode_shard, index_from_codes, train_index
from sept.index.merge import canonical_order
from sept.index.spec import METRICS
from sept.index.store import IndexStore

pytestmark = pytest.mark.integration


def make_index_store(path: str, factory: str, metric: str, nshards: int = 4, n: int = 6000, d: int = 32, seed: int = 0):
    """A real index store (as `sept index` writes it) and the monolithic faiss index of the same codes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = (np.arange(n, dtype=np.int64) * 7919) % (1 << 40)
    trained = train_index(faiss.index_factory(d, factory, METRICS[metric]), x[:4000], seed=seed)
    bounds = np.linspace(0, n, nshards + 1).astype(int)
    store = IndexStore.create(
        path,
        trained=trained,
        attrs=dict(
            metric=metric,
            dim=d,
            nprobe=6,
            ntotal=n,
            assignment=[[j] for j in range(nshards)],
            spec=dict(factory=factory, metric=metric, shards=nshards),
        ),
    )
    mono = faiss.clone_index(trained)
    if faiss.try_extract_index_ivf(mono) is None:
        mono = faiss.IndexIDMap2(mono)
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        offsets, sids, codes = encode_shard(trained, x[a:b], ids[a:b])
        store.write_shard(j, offsets, sids, codes)
    # the monolithic reference is loaded from exactly the stored codes
    parts = [store.read_shard(j) for j in range(nshards)]
    from test_select_merge import _concat_codes

    mono = index_from_codes(trained, *_concat_codes(parts))
    if faiss.try_extract_index_ivf(mono) is not None:
        faiss.ParameterSpace().set_index_parameter(mono, "nprobe", 6)
    store.update_attrs(complete=True)
    return store, mono, x


def reference(mono, xq, k, metric):
    """The monolithic top-k with ties broken by id (a few extra neighbours make the cut the id's)."""
    D, I = canonical_order(*mono.search(xq, k + TIE_MARGIN), metric=metric)
    return D[:, :k], I[:, :k]


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    ray.init(address=ray_cluster.address, logging_level="ERROR")
    yield ray_cluster
    ray.shutdown()


@pytest.mark.parametrize("factory,metric", [("IVF32,PQ8np", "ip"), ("Flat", "l2")])
def test_sharded_search_equals_monolithic_in_waves(ray_driver, tmp_path, factory, metric):
    faiss.omp_set_num_threads(1)
    store, mono, x = make_index_store(str(tmp_path / "index.zarr"), factory, metric)
    xq = x[::50] + 0.01
    k = 20
    Dm, Im = reference(mono, xq, k, metric)
    # one wave, four searchers: spread over both nodes
    stats4 = SearchStats()
    D4, I4 = search_index(store.path, xq, k, batch_size=32, stats=stats4)
    assert len(stats4.waves) == 1 and len(stats4.waves[0]) == 4
    assert len(stats4.nodes) == 2, "searchers should run on both Ray nodes"
    np.testing.assert_array_equal(I4, Im)
    np.testing.assert_array_equal(D4, Dm)
    # one searcher holding all four shards merges them itself and answers once per batch
    stats1 = SearchStats()
    D1, I1 = search_index(store.path, xq, k, searchers=1, batch_size=32, stats=stats1)
    assert stats1.waves == [[[0, 1, 2, 3]]]
    np.testing.assert_array_equal(I1, Im)
    np.testing.assert_array_equal(D1, Dm)
    # a memory limit that holds one shard (plus the quantizer and queries) but not two: waves
    one_shard = max(stats4.group_bytes[0])
    stats = SearchStats()
    D, I = search_index(store.path, xq, k, searchers=2, memory_per_searcher=one_shard, batch_size=32, stats=stats)
    assert len(stats.waves) == 2, f"expected two waves, got plan {stats.waves}"
    assert all(
        len(g) == 1 and b <= one_shard for wave, bs in zip(stats.waves, stats.group_bytes) for g, b in zip(wave, bs)
    )
    assert stats.batches == -(-len(xq) // 32)
    np.testing.assert_array_equal(I, Im)
    np.testing.assert_array_equal(D, Dm)


def test_killed_searcher_is_restarted_and_its_queries_redone(ray_driver, tmp_path):
    faiss.omp_set_num_threads(1)
    store, mono, x = make_index_store(str(tmp_path / "index.zarr"), "Flat", "ip", nshards=2, n=4000)
    xq = x[::10] + 0.01  # 400 queries in 40 batches: the killed searcher still has work queued
    k = 10
    stats = SearchStats()
    killed = []

    def kill_one(done, total):
        if not killed:
            pid = stats.searcher_pids[1]
            os.kill(pid, signal.SIGKILL)  # a real death: the process is gone without a word
            killed.append(pid)

    D, I = search_index(store.path, xq, k, batch_size=10, stats=stats, on_batch=kill_one)
    assert killed and stats.restarts >= 1
    assert stats.searcher_pids[1] != killed[0], "a new searcher process took over the shards"
    Dm, Im = reference(mono, xq, k, "ip")
    np.testing.assert_array_equal(I, Im)
    np.testing.assert_array_equal(D, Dm)


def test_stalled_searcher_is_replaced_after_its_timeout_and_the_search_completes(ray_driver, tmp_path, caplog):
    """A searcher frozen mid-search (SIGSTOP: alive to Ray, but never answering, as on a hung read)."""
    import logging

    faiss.omp_set_num_threads(1)
    store, mono, x = make_index_store(str(tmp_path / "index.zarr"), "Flat", "ip", nshards=2, n=4000)
    xq = x[::10] + 0.01
    k = 10
    stats = SearchStats()
    frozen = []

    def freeze_one(done, total):
        if not frozen:
            frozen.append(stats.searcher_pids[1])
            os.kill(frozen[0], signal.SIGSTOP)

    caplog.set_level(logging.WARNING, logger="sept.cluster.search")
    try:
        D, I = search_index(store.path, xq, k, batch_size=10, stats=stats, on_batch=freeze_one, batch_timeout_s=4)
    finally:
        if frozen:
            try:
                os.kill(frozen[0], signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen and stats.restarts >= 1 and stats.searcher_pids[1] != frozen[0]
    assert "answered no batch in 4s" in caplog.text
    Dm, Im = reference(mono, xq, k, "ip")
    np.testing.assert_array_equal(I, Im)
    np.testing.assert_array_equal(D, Dm)
