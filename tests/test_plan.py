"""sept plan against a hand-computed example, with the profile read from a file."""

import json
import math

import pytest

from sept.cluster.plan import GIB, PlanInputs, Profile, estimate
from sept.errors import SeptError

PROFILE = dict(
    name="toy",
    source="hand-written for the test",
    embed_images_per_s_per_device=1000.0,
    index_encode_vectors_per_s_per_node=1_000_000.0,
    index_train_s=600.0,
    search_queries_per_s_per_shard=500.0,
    pretrain_images_per_s_per_device=2000.0,
    read_mb_per_s_per_node=1000.0,
    image_bytes=50_000.0,
)


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    return Profile.load(str(path))


def test_hand_computed_billion_image_plan(profile):
    inp = PlanInputs(
        images=1_000_000_000,
        dim=256,
        devices=64,
        nodes=8,
        memory_per_node_gib=64,
        budget_fraction=0.1,
        queries=10_000,
        pretrain_epochs=100,
    )
    plan = estimate(inp, profile)
    # choose_factory: nlist = 2**round(log2(8*sqrt(1e9))) = 2**18 (c = 4 at 1M, doubled at 1000x
    # more), past 2**16 an HNSW quantizer; PQ dim/2 = 128 bytes
    assert plan["factory"] == "IVF262144_HNSW32,PQ128"
    idx = 1e9 * (128 + 8) + 262144 * 256 * 4  # codes + ids + centroids
    assert plan["stages"]["index"]["memory_gib"] == pytest.approx(idx / GIB)
    shards = math.ceil(idx / (0.5 * 64 * GIB))  # each searcher holds half a node's memory of codes
    assert plan["stages"]["index"]["shards"] == shards == 4
    # embed: compute 1e9 / (1000 * 64) = 15625 s; reading 1e9 * 50 kB at 8 GB/s = 6250 s -> compute-bound
    assert plan["stages"]["embed"]["seconds"] == pytest.approx(15625)
    assert plan["stages"]["embed"]["bound"] == "compute"
    assert plan["stages"]["index"]["seconds"] == pytest.approx(600 + 1e9 / 8e6)
    # select: 10k queries x 4 shards at 500 q/s per shard on 4 searchers, plus one read of the pool
    assert plan["stages"]["select"]["seconds"] == pytest.approx(10_000 * 4 / (500 * 4) + 6250)
    assert plan["stages"]["select"]["searchers"] == 4 and plan["stages"]["select"]["waves"] == 1
    # coordinator: 1e8 selected at 56 B each, plus 10k queries x 2 x their 10k share of neighbours at 12 B
    assert plan["stages"]["select"]["neighbours"] == 10_000 * 20_000
    assert plan["stages"]["select"]["coordinator_memory_gib"] == pytest.approx((1e8 * 56 + 2e8 * 12) / GIB)
    assert plan["stages"]["pretrain"]["seconds"] == pytest.approx(100 * 1e8 / (2000 * 64))
    assert plan["storage_gib"]["embeddings"] == pytest.approx(1e9 * (256 * 2 + 8) / GIB)
    assert plan["storage_gib"]["selected_shards"] == pytest.approx(1e8 * 50_000 / GIB)


def test_profile_errors_name_the_file(tmp_path):
    with pytest.raises(SeptError, match="nope.json"):
        Profile.load(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(SeptError, match="bad.json lacks"):
        Profile.load(str(bad))


def test_cli_prints_plan(tmp_path):
    from conftest import run_sept

    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    out = run_sept(
        "plan",
        "--images",
        "1000000000",
        "--dim",
        "256",
        "--gpus",
        "64",
        "--nodes",
        "8",
        "--memory-per-node",
        "64",
        "--profile",
        str(path),
    ).stdout
    assert "IVF262144_HNSW32,PQ128" in out and "4 shard(s)" in out and "4h20m25s" in out
