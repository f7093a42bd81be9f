"""The walking skeleton end to end: bootstrap, embed (two-node Ray), index (two shards), select,
pretrain (submitit on the two-node SLURM dev cluster, DDP over gloo) and evaluate, all through
the `sept` command line and real Ray, FAISS, Zarr, WebDataset, submitit and SLURM.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import webdataset as wds
from conftest import run_sept, slurm_available
from PIL import Image

from sept.data.demo_corpus import make_demo_corpus
from sept.data.samples import iter_samples
from sept.data.shards import list_shards
from sept.index.embedding_store import EmbeddingStore

pytestmark = pytest.mark.integration

BUDGET = 60


def _write_extra_shard(path: str) -> list[str]:
    """A pool shard with two good samples and one undecodable image: that one is skipped and counted."""
    keys = []
    with wds.TarWriter(path) as sink:
        for i, colour in enumerate([(250, 10, 10), (10, 250, 10)]):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
            key = f"extra{i:04d}"
            sink.write({"__key__": key, "jpg": buf.getvalue(), "json": json.dumps({"key": key}).encode()})
            keys.append(key)
        sink.write({"__key__": "extra_bad", "jpg": b"\xff\xd8 definitely not a jpeg", "json": b"{}"})
    return keys


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("pipeline")
    corpus = make_demo_corpus(
        str(root / "corpus"), pool_size=480, shards=3, target_train_per_class=4, target_val_per_class=4, seed=1
    )
    extra = str(root / "extra.tar")
    _write_extra_shard(extra)
    listing = root / "pool.txt"
    listing.write_text("\n".join(list_shards(corpus.pool_spec) + [extra]) + "\n")
    paths = dict(
        root=root,
        corpus=corpus,
        pool=str(listing),
        encoder=str(root / "enc.pt"),
        emb=str(root / "emb.zarr"),
        index=str(root / "index.zarr"),
        selection=str(root / "sel"),
    )
    run_sept(
        "bootstrap",
        "--pool",
        paths["pool"],
        "--out",
        paths["encoder"],
        "--sample-size",
        "480",
        "--steps",
        "150",
        "--target",
        corpus.target_dir,
    )
    embed = ray_cluster.run_sept(
        "embed",
        "--pool",
        paths["pool"],
        "--encoder",
        paths["encoder"],
        "--out",
        paths["emb"],
        "--workers",
        "2",
        "--batch-size",
        "64",
    )
    paths["embed_summary"] = json.loads(embed.stdout[embed.stdout.index("{") :])
    ray_cluster.run_sept(
        "index", "--embeddings", paths["emb"], "--out", paths["index"], "--shards", "2", "--factory", "Flat"
    )
    ray_cluster.run_sept(
        "select",
        "--index",
        paths["index"],
        "--encoder",
        paths["encoder"],
        "--target",
        corpus.target_dir,
        "--budget",
        str(BUDGET),
        "--out",
        paths["selection"],
        "--task",
        "digits",
    )
    return paths


def _manifest(paths) -> list[dict]:
    with open(os.path.join(paths["selection"], "tasks", "digits", "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_pool_sample_embedded_exactly_once_on_both_nodes(pipeline):
    store = EmbeddingStore.open(pipeline["emb"])
    _, ids = store.read_all()
    decodable = sum(1 for shard in list_shards(pipeline["pool"]) for s in iter_samples(shard)) - 1
    assert len(ids) == decodable == 480 + 2
    assert len(np.unique(ids)) == len(ids)
    summary = pipeline["embed_summary"]
    assert summary["bad_samples"] == 1  # the planted undecodable image, skipped and counted
    assert len(summary["nodes"]) == 2, "both Ray nodes should have embedded shards"


def test_flat_merged_topk_equals_brute_force(pipeline, ray_cluster):
    from sept.cluster.search import search_index

    x, ids = EmbeddingStore.open(pipeline["emb"]).read_all()
    xq = x[::37][:12]
    ray.init(address=ray_cluster.address, logging_level="ERROR")
    try:
        D, I = search_index(pipeline["index"], xq, 15)
    finally:
        ray.shutdown()
    scores = xq @ x.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :15]
    np.testing.assert_allclose(D, np.take_along_axis(scores, order, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(I, ids[order])


def test_selection_is_byte_identical(pipeline):
    rows = _manifest(pipeline)
    assert len(rows) == BUDGET
    assert len({r["id"] for r in rows}) == BUDGET
    sources = {}
    for shard in {r["source_shard"] for r in rows}:
        sources.update({(shard, s.key): s.members for s in iter_samples(shard)})
    selected = {}
    for name in os.listdir(os.path.join(pipeline["selection"], "shards")):
        if name.endswith(".tar"):
            selected.update(
                {s.key: s.members for s in iter_samples(os.path.join(pipeline["selection"], "shards", name))}
            )
    for r in rows:
        assert selected[r["key"]] == sources[(r["source_shard"], r["key"])]
        assert set(selected[r["key"]]) >= {"jpg", "json"}
        assert r["retrieved_by"], "every sample names the target images that retrieved it"


def test_selection_precision_far_above_base_rate(pipeline):
    rows = _manifest(pipeline)
    truth = json.loads(Path(pipeline["corpus"].truth_path).read_text())
    precision = np.mean([truth.get(r["key"]) == "digits" for r in rows])
    base_rate = np.mean([d == "digits" for d in truth.values()])
    assert precision >= 2 * base_rate, f"selection precision {precision:.2f} vs base rate {base_rate:.2f}"


def test_pretrain_on_two_slurm_nodes_then_evaluate(pipeline):
    reason = slurm_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    run_dir = str(pipeline["root"] / "run")
    proc = run_sept(
        "pretrain",
        "--data",
        os.path.join(pipeline["selection"], "shards"),
        "--out",
        run_dir,
        "--executor",
        "slurm",
        "--nodes",
        "2",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--partition",
        "debug",
    )
    summary = json.loads(Path(os.path.join(run_dir, "summary.json")).read_text())
    assert summary["world_size"] == 2
    assert summary["allreduce_check"] == 3.0  # (0 + 1) + (1 + 1): both ranks took part
    assert "job" in proc.stdout.lower() or "job_id" in proc.stdout
    ev = run_sept(
        "evaluate", "--encoder", os.path.join(run_dir, "encoder.pt"), "--target", pipeline["corpus"].target_dir
    )
    result = json.loads(ev.stdout[ev.stdout.index("{") :])
    assert 0.0 <= result["linear_probe"] <= 1.0 and 0.0 <= result["knn"] <= 1.0


# ---- bad input: one clear line naming the item, and a non-zero exit ---------------------------


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_missing_shard_is_named(pipeline, tmp_path):
    listing = tmp_path / "pool.txt"
    listing.write_text(f"{tmp_path}/nope-00042.tar\n")
    proc = run_sept(
        "embed", "--pool", str(listing), "--encoder", pipeline["encoder"], "--out", str(tmp_path / "e"), check=False
    )
    assert "nope-00042.tar" in _error_line(proc)


def test_target_without_images_is_named(pipeline, tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    proc = run_sept(
        "select",
        "--index",
        pipeline["index"],
        "--encoder",
        pipeline["encoder"],
        "--target",
        str(tmp_path / "empty"),
        "--budget",
        "5",
        "--out",
        str(tmp_path / "s"),
        check=False,
    )
    assert "empty" in _error_line(proc)


def test_budget_larger_than_pool(pipeline, tmp_path):
    proc = run_sept(
        "select",
        "--index",
        pipeline["index"],
        "--encoder",
        pipeline["encoder"],
        "--target",
        pipeline["corpus"].target_dir,
        "--budget",
        "100000",
        "--out",
        str(tmp_path / "s"),
        check=False,
    )
    assert "100000" in _error_line(proc)


def test_encoder_of_other_dimension_is_refused(pipeline, tmp_path):
    import torchvision

    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    proc = run_sept(
        "select",
        "--index",
        pipeline["index"],
        "--encoder",
        path,
        "--target",
        pipeline["corpus"].target_dir,
        "--budget",
        "5",
        "--out",
        str(tmp_path / "s"),
        check=False,
    )
    line = _error_line(proc)
    assert "512" in line and "resnet18.pth" in line


def test_output_holding_another_run_is_never_overwritten(pipeline):
    before = Path(os.path.join(pipeline["selection"], "tasks", "digits", "manifest.jsonl")).read_text()
    proc = run_sept(
        "select",
        "--index",
        pipeline["index"],
        "--encoder",
        pipeline["encoder"],
        "--target",
        pipeline["corpus"].target_dir,
        "--budget",
        str(BUDGET + 1),
        "--out",
        pipeline["selection"],
        "--task",
        "digits",
        check=False,
    )
    assert pipeline["selection"] in _error_line(proc)
    assert Path(os.path.join(pipeline["selection"], "tasks", "digits", "manifest.jsonl")).read_text() == before
