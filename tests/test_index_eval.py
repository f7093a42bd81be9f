"""sept index eval reads a sample of the index shards, drawn by the seed, and says which."""

from __future__ import annotations

import shutil

import pytest
import ray
from conftest import run_sept
from test_index_build import PER_SHARD, _store

from sept.cluster.index_build import IndexConfig, build_index
from sept.index.eval import EvalConfig, evaluate_index, sample_shards
from sept.index.spec import IndexSpec
from sept.index.store import IndexStore, shard_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    ray.init(address=ray_cluster.address, logging_level="ERROR")
    yield ray_cluster
    ray.shutdown()


def test_shard_sample_is_drawn_by_the_seed():
    assert sample_shards(10, 3, seed=0) == sample_shards(10, 3, seed=0)
    assert len(set(sample_shards(10, 3, seed=0))) == 3 and sample_shards(10, 3, seed=0) == sorted(
        sample_shards(10, 3, seed=0)
    )
    assert len({tuple(sample_shards(10, 3, seed=s)) for s in range(8)}) > 1
    assert sample_shards(3, 4, seed=0) == sample_shards(3, 0, seed=0) == [0, 1, 2]  # all when no more


def test_eval_reads_only_the_sampled_shards(ray_driver, tmp_path):
    emb_path, index_path = str(tmp_path / "emb.zarr"), str(tmp_path / "index.zarr")
    _store(emb_path, shards=range(4), pool_len=4)
    build_index(IndexConfig(emb_path, index_path, IndexSpec(factory="IVF16,Flat", shards=4)))
    full = evaluate_index(EvalConfig(index_path, emb_path, queries=100, nprobes=[16], eval_shards=0))
    assert full["shards_used"] == [0, 1, 2, 3] and full["searched_vectors"] == 4 * PER_SHARD

    used = sample_shards(4, 2, seed=0)
    for j in set(range(4)) - set(used):  # the other shards are gone: eval must not need them
        shutil.rmtree(tmp_path / "index.zarr" / "shards" / shard_name(j))
    result = evaluate_index(EvalConfig(index_path, emb_path, queries=100, nprobes=[1, 16], eval_shards=2))
    assert result["shards_used"] == used and result["shards_total"] == 4
    assert result["searched_vectors"] == 2 * PER_SHARD and result["ntotal"] == 4 * PER_SHARD
    # the exact search runs over the same shards: probing every list finds its neighbours (over all 4
    # shards half of them would lie in the unsearched ones); ties between near-equal scores aside
    assert result["rows"][-1]["recall_at_k"] >= 0.99
    assert IndexStore.open(index_path).attrs["nprobe"] == result["chosen_nprobe"]

    proc = run_sept(
        "index", "eval", "--index", index_path, "--embeddings", emb_path, "--queries", "50",
        "--nprobe-sweep", "16", "--eval-shards", "2", "--out", str(tmp_path / "t.json"),
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert f"index shard(s) {used[0]}, {used[1]} of 4 searched, {2 * PER_SHARD} vectors" in lines[0]
    assert lines[1].split() == ["nprobe", "recall@1", "recall@10", "QPS"]
