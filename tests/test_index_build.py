"""sept index on the two-node Ray cluster: build, resume, --add (never a rebuild), eval, bad input;
the chosen training sample, encoding tasks of several CPUs and split into parts, counts from attributes.

Embeddings are synthetic clustered vectors written straight into an embeddings store, so these
tests exercise indexing alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import ray
from conftest import run_sept

from sept.cluster.index_build import IndexConfig, build_index, merge_parts, split_pool_shards
from sept.data.identity import make_ids
from sept.errors import SeptError
from sept.index.codes import encode_shard, train_index
from sept.index.embedding_store import EmbeddingStore, EncoderIdentity
from sept.index.eval import EvalConfig, evaluate_index, exact_knn
from sept.index.merge import merge_topk
from sept.index.spec import IndexSpec, make_index
from sept.index.store import IndexStore

pytestmark = pytest.mark.integration

DIM, PER_SHARD = 16, 400


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    ray.init(address=ray_cluster.address, logging_level="ERROR")
    yield ray_cluster
    ray.shutdown()


def _vectors(shard: int, n: int = PER_SHARD, seed: int = 0) -> np.ndarray:
    centers = np.random.default_rng(seed).normal(size=(12, DIM))
    rng = np.random.default_rng(1000 * seed + shard)
    x = centers[rng.integers(len(centers), size=n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(path: str, shards: list[int], pool_len: int, *, identity: str = "enc-a", seed: int = 0) -> EmbeddingStore:
    store = EmbeddingStore.create_or_open(
        path,
        encoder=EncoderIdentity(identity, "resnet18_small", DIM, 32),
        pool=[f"/pool/shard-{i}.tar" for i in range(pool_len)],
    )
    for i in shards:
        if not store.is_complete(i):
            store.write_shard(i, _vectors(i, seed=seed), make_ids(i, range(PER_SHARD)))
    return store


def _tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(Path(os.path.join(root, name)).read_bytes())
    return h.hexdigest()


def _search_all(index_path: str, xq: np.ndarray, k: int, nprobe: int):
    store = IndexStore.open(index_path)
    results = []
    for j in range(store.nshards):
        index = store.load_shard(j)
        index.nprobe = nprobe
        results.append(index.search(xq, k))
    return merge_topk(results, k, metric="ip")


def test_partial_build_then_add_encodes_only_the_new_vectors(ray_driver, tmp_path):
    emb_path, index_path = str(tmp_path / "emb.zarr"), str(tmp_path / "index.zarr")
    _store(emb_path, shards=[0, 1, 2, 3], pool_len=6)
    spec = IndexSpec(factory="IVF16,Flat", shards=2, train_size=1000)
    with pytest.raises(SeptError, match=r"2 incomplete shard\(s\), first /pool/shard-4.tar.*--allow-partial"):
        build_index(IndexConfig(emb_path, index_path, spec))
    summary = build_index(IndexConfig(emb_path, index_path, spec, allow_partial=True))
    assert summary["ntotal"] == 4 * PER_SHARD and summary["shards"] == 2
    assert summary["left_out_incomplete"] == ["/pool/shard-4.tar", "/pool/shard-5.tar"]
    store = IndexStore.open(index_path)
    trained = _tree_digest(os.path.join(index_path, "trained"))
    old_shards = [_tree_digest(os.path.join(index_path, "shards", f"{j:05d}")) for j in range(2)]

    _store(emb_path, shards=[4, 5], pool_len=7)  # the pool grew by one shard, which is not embedded yet
    with pytest.raises(SeptError, match="pass --add"):
        build_index(IndexConfig(emb_path, index_path, spec, allow_partial=True))
    summary = build_index(IndexConfig(emb_path, index_path, spec, add=True, allow_partial=True))
    assert summary["added"] == 2 * PER_SHARD and summary["ntotal"] == 6 * PER_SHARD
    assert store.nshards == 3  # new vectors went into a new index shard...
    assert _tree_digest(os.path.join(index_path, "trained")) == trained  # ...with the quantizer as trained
    assert [_tree_digest(os.path.join(index_path, "shards", f"{j:05d}")) for j in range(2)] == old_shards
    again = build_index(IndexConfig(emb_path, index_path, spec, add=True, allow_partial=True))
    assert again["added"] == 0 and again["ntotal"] == 6 * PER_SHARD

    # IVF,Flat probing every list is exact: the grown index answers like brute force over all 6 shards
    x, ids = EmbeddingStore.open(emb_path).read_all()
    xq = x[::97]
    D, I = _search_all(index_path, xq, 5, nprobe=16)
    De, Ie = exact_knn(xq, [(x, ids)], 5, "ip")
    np.testing.assert_array_equal(I, Ie)
    np.testing.assert_allclose(D, De, rtol=1e-5, atol=1e-5)


def test_eval_sweeps_nprobe_and_stores_the_choice(ray_driver, tmp_path):
    emb_path, index_path = str(tmp_path / "emb.zarr"), str(tmp_path / "index.zarr")
    _store(emb_path, shards=range(4), pool_len=4)
    build_index(IndexConfig(emb_path, index_path, IndexSpec(factory="IVF32,Flat", shards=2, train_size=1600)))
    result = evaluate_index(EvalConfig(index_path, emb_path, queries=200, nprobes=[1, 2, 8, 32], target_recall=0.9))
    recalls = [row["recall_at_k"] for row in result["rows"]]
    assert [row["nprobe"] for row in result["rows"]] == [1, 2, 8, 32]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0 and recalls[0] < 1.0  # all lists probed: exact
    assert all(row["qps"] > 0 for row in result["rows"])
    chosen = result["chosen_nprobe"]
    assert chosen == min(r["nprobe"] for r in result["rows"] if r["recall_at_k"] >= 0.9)
    assert IndexStore.open(index_path).attrs["nprobe"] == chosen
    with open(os.path.join(index_path, "eval.json")) as f:
        assert json.load(f)["rows"] == result["rows"]

    # the same through the command line: a table with one row per nprobe and the exact baseline
    proc = run_sept(
        "index",
        "eval",
        "--index",
        index_path,
        "--embeddings",
        emb_path,
        "--queries",
        "100",
        "--nprobe-sweep",
        "1,32",
        "--out",
        str(tmp_path / "t.json"),
    )
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["nprobe", "recall@1", "recall@10", "QPS"]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "32", "exact"]
    assert os.path.exists(tmp_path / "t.json")


def test_leave_one_out_exact_search_matches_numpy():
    x = _vectors(0, 300)
    ids = np.arange(300, dtype=np.int64) * 7
    batches = [(x[a : a + 64], ids[a : a + 64]) for a in range(0, 300, 64)]  # a last batch smaller than k
    D, I = exact_knn(x[:20], batches, 70, "ip")
    order = np.argsort(-(x[:20] @ x.T), axis=1, kind="stable")[:, :70]
    np.testing.assert_array_equal(I, ids[order])


def test_bad_input_is_refused_with_a_clear_error(ray_driver, tmp_path):
    emb_path = str(tmp_path / "emb.zarr")
    _store(emb_path, shards=[0, 1], pool_len=2)
    with pytest.raises(SeptError, match="faiss rejects factory string 'IVF0,PQ7'"):
        build_index(IndexConfig(emb_path, str(tmp_path / "a.zarr"), IndexSpec(factory="IVF0,PQ7")))
    with pytest.raises(SeptError, match="too small for any index"):
        build_index(IndexConfig(emb_path, str(tmp_path / "b.zarr"), memory_budget=1000))
    with pytest.raises(SeptError, match="--add needs an existing index"):
        build_index(IndexConfig(emb_path, str(tmp_path / "c.zarr"), add=True))
    index_path = str(tmp_path / "index.zarr")
    build_index(IndexConfig(emb_path, index_path, IndexSpec(factory="Flat", shards=1)))
    other = str(tmp_path / "other.zarr")
    _store(other, shards=[0, 1], pool_len=2, identity="enc-b")
    for add in (False, True):
        with pytest.raises(SeptError, match=r"come from encoder enc-b .* built from encoder enc-a"):
            build_index(IndexConfig(other, index_path, IndexSpec(factory="Flat", shards=1), add=add))
    with pytest.raises(SeptError, match="come from encoder enc-b"):
        evaluate_index(EvalConfig(index_path, other))
    same_encoder = str(tmp_path / "same.zarr")
    _store(same_encoder, shards=[0], pool_len=2)
    with pytest.raises(SeptError, match="other embeddings"):
        build_index(IndexConfig(same_encoder, index_path, IndexSpec(factory="Flat", shards=1), allow_partial=True))


def _shards(index_path: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    store = IndexStore.open(index_path)
    return [store.read_shard(j) for j in range(store.nshards)]


def test_tasks_of_two_cpus_split_into_parts_write_what_one_task_writes(ray_driver, tmp_path, monkeypatch):
    emb_path = str(tmp_path / "emb.zarr")
    _store(emb_path, shards=range(6), pool_len=6)
    spec = IndexSpec(factory="IVF16,PQ4", shards=2)  # train_size 0: chosen from the lists
    one = build_index(IndexConfig(emb_path, str(tmp_path / "one.zarr"), spec))
    assert one["encode_threads"] == [1] and one["cpus_per_task"] == 1
    # the derived sample: all 2400 vectors (at least 256*256, bounded by n), said in the reason
    assert one["train_size"] == 6 * PER_SHARD == IndexStore.open(str(tmp_path / "one.zarr")).attrs["spec"]["train_size"]
    assert f"trained on {6 * PER_SHARD} sampled vectors" in one["reason"]
    split_path = str(tmp_path / "split.zarr")
    split = build_index(IndexConfig(emb_path, split_path, spec, cpus_per_task=2, task_vectors=PER_SHARD))
    assert split["encode_threads"] == [2] and split["ntotal"] == 6 * PER_SHARD  # faiss ran 2 OpenMP threads
    for a, b in zip(_shards(str(tmp_path / "one.zarr")), _shards(split_path), strict=True):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(SeptError, match="--cpus-per-task 3 exceeds the CPUs of every Ray node"):
        build_index(IndexConfig(emb_path, str(tmp_path / "big.zarr"), spec, cpus_per_task=3))

    # once built, a rerun counts the shards' vectors from their attributes and reads no codes
    def no_reads(self, j):
        raise AssertionError(f"read index shard {j}")

    monkeypatch.setattr(IndexStore, "read_shard", no_reads)
    again = build_index(IndexConfig(emb_path, split_path, spec))
    assert again["ntotal"] == 6 * PER_SHARD
    store = IndexStore.open(split_path)
    assert [store.shard_ntotal(j) for j in range(2)] == [3 * PER_SHARD, 3 * PER_SHARD]


def test_a_chosen_factory_is_trained_on_the_chosen_sample(ray_driver, tmp_path):
    emb_path = str(tmp_path / "emb.zarr")
    _store(emb_path, shards=range(4), pool_len=4)
    # 1600 vectors of 16 dims: Flat (102 KiB) does not fit 60000 bytes, IVF128,SQ8 does
    summary = build_index(IndexConfig(emb_path, str(tmp_path / "i.zarr"), memory_budget=60_000))
    assert summary["factory"] == "IVF128,SQ8", summary["reason"]
    assert summary["train_size"] == 4 * PER_SHARD and f"trained on {4 * PER_SHARD} sampled" in summary["reason"]
    given = build_index(
        IndexConfig(emb_path, str(tmp_path / "g.zarr"), IndexSpec(factory="IVF16,Flat", train_size=500))
    )
    assert given["train_size"] == 500 and "given with --factory; trained on 500 sampled vectors" in given["reason"]


def test_parts_merge_into_the_shard_one_encoding_gives():
    x = np.concatenate([_vectors(i) for i in range(3)])
    ids = np.arange(len(x), dtype=np.int64) * 3
    trained = train_index(make_index("IVF8,PQ4", DIM, faiss.METRIC_INNER_PRODUCT), x, seed=0)
    whole = encode_shard(trained, x, ids)
    cuts = [0, 100, 100, 700, len(x)]  # an empty part too
    parts = [encode_shard(trained, x[a:b], ids[a:b]) for a, b in zip(cuts, cuts[1:])]
    for got, want in zip(merge_parts(parts), whole, strict=True):
        np.testing.assert_array_equal(got, want)
    counts = {0: 5, 1: 5, 2: 12, 3: 1, 4: 4}
    assert split_pool_shards([0, 1, 2, 3, 4], counts, 10) == [[0, 1], [2], [3, 4]]
    assert split_pool_shards([0, 1, 2, 3, 4], counts, 0) == [[0, 1, 2, 3, 4]]


def test_an_encoding_task_past_its_deadline_is_retried_then_named(ray_driver, tmp_path):
    emb_path = str(tmp_path / "emb.zarr")
    _store(emb_path, shards=[0, 1], pool_len=2)
    cfg = IndexConfig(
        emb_path,
        str(tmp_path / "index.zarr"),
        IndexSpec(factory="Flat", shards=2),
        task_timeout_s=0.001,
        max_attempts=2,
    )
    with pytest.raises(SeptError, match=r"index shard \d \(pool shards \d\.\.\d\): no result in 0.001s, 2 time\(s\)"):
        build_index(cfg)
    cfg.task_timeout_s = 600.0  # the same build given time: it completes, nothing half-written in the way
    build_index(cfg)
    assert IndexStore.open(cfg.out).attrs["complete"]
