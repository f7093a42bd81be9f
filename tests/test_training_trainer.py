"""The trainer in this process (world size 1) and the local submitit launcher with 2 ranks."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sept.errors import SeptError
from sept.training.acceleration import AccelerationPlan
from sept.training.bootstrap import bootstrap, sample_pool
from sept.training.config import load_config
from sept.training.encoder import load_encoder
from sept.training.job_shape import JobShape
from sept.training.launcher import launch_pretrain
from sept.training.trainer import train

torch.set_num_threads(1)


def make_pool(directory, shard_sizes, size=16, seed=0):
    """WebDataset shards of small random JPEGs, named as img2dataset names them."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard, count in enumerate(shard_sizes):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as writer:
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
                writer.write({"__key__": f"{shard:05d}{i:04d}", "jpg": buffer.getvalue(), "json": b"{}"})
    return str(directory)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), [20, 20])


def _cfg(pool, out, **overrides):
    base = dict(data=pool, out=str(out), steps=4, batch_size=8, image_size=16, width=8, log_every=2, checkpoint_every=2)
    return load_config(None, {**base, **overrides})


def _metric_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_train_writes_the_run_directory(pool, tmp_path, method):
    summary = train(_cfg(pool, tmp_path / "run", method=method))
    run_dir = str(tmp_path / "run")
    assert summary["world_size"] == 1 and summary["steps"] == 4 and summary["allreduce_check"] == 1
    assert np.isfinite(summary["first_loss"]) and np.isfinite(summary["final_loss"])
    assert summary["ranks"][0]["samples_read"] == 32
    assert json.loads(Path(os.path.join(run_dir, "summary.json")).read_text()) == summary
    assert _metric_steps(run_dir) == [1, 2, 4]
    assert load_config(os.path.join(run_dir, "config.yaml")).method == method
    bundle = load_encoder(os.path.join(run_dir, "encoder.pt"), device="cpu")
    assert (bundle.arch, bundle.dim, bundle.image_size) == ("resnet18_small", 64, 16)
    assert bundle.extra["method"] == method and bundle.extra["steps"] == 4


def test_resume_restores_step_model_and_metrics(pool, tmp_path):
    run = tmp_path / "run"
    train(_cfg(pool, run))
    finished = load_encoder(str(run / "encoder.pt"), device="cpu").identity

    again = train(_cfg(pool, run))  # checkpoint at the last step: nothing left to train
    assert again["resumed_from_step"] == 4 and again["steps"] == 4
    assert load_encoder(str(run / "encoder.pt"), device="cpu").identity == finished

    longer = train(_cfg(pool, run, steps=6))
    assert longer["resumed_from_step"] == 4 and longer["steps"] == 6
    assert _metric_steps(str(run)) == [1, 2, 4, 5, 6]
    assert load_encoder(str(run / "encoder.pt"), device="cpu").identity != finished
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6


def test_fast_preset_follows_its_plan_and_extends_by_more_cycles(pool, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(
        None,
        dict(
            data=pool,
            out=str(run),
            steps=6,
            cycle_steps=3,
            batch_size=8,
            image_size=16,
            width=8,
            log_every=1,
            checkpoint_every=3,
            sample_log=True,
        ),
        preset="fast",
    )
    summary = train(cfg)
    plan = AccelerationPlan.from_config(cfg)
    rows = _rows(run / "metrics.csv")
    assert [int(r["image_size"]) for r in rows] == [plan.image_size_at(s) for s in range(6)] == [12, 12, 16] * 2
    assert [float(r["lr"]) for r in rows] == pytest.approx([plan.lr(s) for s in range(6)], rel=1e-5)
    assert summary["final_image_size"] == 16 and summary["epoch"] == 1  # 5 batches per epoch
    # Per-rank throughput and data wait: in the summary and one row per rank and log step.
    rank_rows = _rows(run / "rank_metrics.csv")
    assert [(int(r["step"]), int(r["rank"])) for r in rank_rows] == [(s, 0) for s in range(1, 7)]
    assert all(float(r["imgs_per_s"]) > 0 and float(r["data_wait_s"]) >= 0 for r in rank_rows)
    assert summary["ranks"][0]["images_per_s"] > 0 and summary["ranks"][0]["data_wait_s"] > 0
    assert all(0 <= float(r["max_data_wait_frac"]) <= 1 for r in rows)

    longer = train(
        load_config(
            None,
            {
                **dict(
                    data=pool,
                    out=str(run),
                    steps=9,
                    cycle_steps=3,
                    batch_size=8,
                    image_size=16,
                    width=8,
                    log_every=1,
                    checkpoint_every=3,
                    sample_log=True,
                )
            },
            preset="fast",
        )
    )
    assert longer["resumed_from_step"] == 6 and [a["start_step"] for a in longer["attempts"]] == [0, 6]
    rows = _rows(run / "metrics.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx([plan.lr(s) for s in range(9)], rel=1e-5)
    epochs = {}
    for r in _rows(run / "samples-rank0.csv"):
        epochs.setdefault(int(r["epoch"]), []).extend(r["ids"].split())
        assert r["pool_ids"] == r["ids"]  # trained on the pool itself, its ids are the pool's
    assert sorted(epochs) == [0, 1] and len(epochs[0]) == len(set(epochs[0])) == 40
    assert len(epochs[1]) == len(set(epochs[1])) == 32


def test_run_ahead_trains_on_the_same_batches(pool, tmp_path):
    here = train(_cfg(pool, tmp_path / "here", steps=12, sample_log=True))
    ahead = train(_cfg(pool, tmp_path / "ahead", steps=12, sample_log=True, run_ahead=2))
    assert torch.get_num_threads() == 1  # the caller's threads come back after the run
    assert _rows(tmp_path / "ahead" / "samples-rank0.csv") == _rows(tmp_path / "here" / "samples-rank0.csv")
    assert ahead["epoch"] == here["epoch"] == 2  # 5 batches per epoch
    assert ahead["final_loss"] == pytest.approx(here["final_loss"], rel=1e-4)


@pytest.mark.parametrize("run_ahead", [0, 2])
def test_bad_samples_end_the_epoch_early_without_repeats(tmp_path, run_ahead):
    pool = str(tmp_path / "pool")
    make_pool(tmp_path / "pool", [16])
    with open(os.path.join(pool, "00000.tar"), "r+b") as f:  # corrupt the first JPEG's bytes in place
        data = f.read()
        start = data.index(b"\xff\xd8\xff")
        f.seek(start + 100)
        f.write(b"\x00" * 200)
    summary = train(_cfg(pool, tmp_path / "run", steps=5, batch_size=4, sample_log=True, run_ahead=run_ahead))
    assert summary["steps"] == 5 and summary["ranks"][0]["bad_samples"] >= 1
    epochs = {}
    for r in _rows(tmp_path / "run" / "samples-rank0.csv"):
        epochs.setdefault(int(r["epoch"]), []).extend(r["ids"].split())
    assert len(epochs[0]) == 12  # 16 samples, one bad: the fourth batch cannot fill
    assert all(len(ids) == len(set(ids)) for ids in epochs.values())


def test_a_requested_gpu_that_is_missing_is_an_error(pool, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SeptError, match=r"needs GPU 0, but 0 GPU\(s\) are visible"):
        train(_cfg(pool, tmp_path / "run", device="cuda"))


def test_checkpoint_of_another_config_is_refused(pool, tmp_path):
    train(_cfg(pool, tmp_path / "run"))
    with pytest.raises(SeptError, match=r"belongs to a run with another config \(method: 'simclr' -> 'byol'\)"):
        train(_cfg(pool, tmp_path / "run", method="byol"))


def test_bootstrap_trains_an_encoder_on_a_pool_subset(pool, tmp_path):
    out = tmp_path / "retrieval.pt"
    path = bootstrap(pool, str(out), sample_size=16, steps=2, batch_size=8, image_size=16, width=8, min_shards=2)
    bundle = load_encoder(path, device="cpu")
    assert bundle.extra["stage"] == "bootstrap" and bundle.extra["sample_size"] == 16
    assert bundle.extra["data"] == pool
    assert not os.path.exists(str(out) + ".bootstrap/checkpoint.pt")
    with pytest.raises(SeptError, match="bootstrap sets config key 'data'"):
        bootstrap(pool, str(out), data="x")


def test_bootstrap_reads_a_config_file_and_lets_arguments_win(pool, tmp_path):
    config = tmp_path / "boot.yaml"
    config.write_text("steps: 3\nbatch_size: 8\nimage_size: 16\nwidth: 8\nmethod: byol\n")
    out = str(tmp_path / "enc.pt")
    bootstrap(pool, out, config=str(config), sample_size=16, min_shards=2, method="moco")
    summary = json.loads(Path(out + ".bootstrap/summary.json").read_text())
    assert summary["steps"] == 3 and summary["method"] == "moco" and summary["num_samples"] == 16
    bootstrap(pool, out, config=str(config), sample_size=16, min_shards=2, steps=2, method="moco")
    assert load_encoder(out, device="cpu").extra["steps"] == 2


def test_bootstrap_sample_is_seeded_and_spread_over_shards(pool):
    from sept.data.shards import list_shards

    shards = list_shards(pool)
    items, scanned, seen = sample_pool(shards, 10, seed=3, min_shards=2)
    again, _, _ = sample_pool(shards, 10, seed=3, min_shards=2)
    other, _, _ = sample_pool(shards, 10, seed=4, min_shards=2)
    keys = lambda xs: [(s, k) for s, k, _, _ in xs]  # noqa: E731
    assert (scanned, seen, len(items)) == (2, 40, 10)
    assert keys(items) == keys(again) and keys(items) != keys(other)
    assert {s for s, _, _, _ in items} == {0, 1}


def test_trainer_imports_neither_submitit_nor_ray():
    code = (
        "import sys, sept.training.trainer, sept.training.bootstrap; "
        "print(sorted(m for m in ('submitit', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.integration
def test_local_launcher_runs_two_ddp_ranks(pool, tmp_path):
    run = tmp_path / "ddp"
    summary = launch_pretrain(_cfg(pool, run, steps=3), executor="local", shape=JobShape(tasks_per_node=2, time_min=5))
    assert summary["world_size"] == 2
    assert summary["allreduce_check"] == 3
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert all(r["samples_read"] == 24 for r in summary["ranks"])
    assert summary["job_id"] and os.path.isdir(summary["log_folder"])
    assert os.path.dirname(summary["log_folder"]) == str(run)
    assert load_encoder(str(run / "encoder.pt"), device="cpu").extra["world_size"] == 2
    assert json.loads(Path(run / "summary.json").read_text())["allreduce_check"] == 3
