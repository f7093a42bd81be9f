"""A running 2-node pre-training job on the SLURM dev cluster is interrupted and requeued, and the
requeued job must continue from the saved step (neither restart nor skip), at the same data
position and learning rate. Two ways in: someone runs `scontrol requeue` (the job gets SIGTERM,
checkpoints if it can, and is restarted by SLURM), and SLURM's time-limit warning USR2 (the job
checkpoints and requeues itself through submitit). Needs `bash slurm/dev-cluster.sh up`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import slurm_available
from PIL import Image

from sept.training.acceleration import AccelerationPlan
from sept.training.config import load_config
from sept.training.job_shape import JobShape
from sept.training.launcher import launch_pretrain
from sept.training.run_logs import read_step_csv, samples_filename

pytestmark = pytest.mark.integration

STEPS = 40
REQUEUE_AFTER_STEP = 14
DEADLINE_S = 150


def _make_pool(directory, shard_sizes, size=16):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard, count in enumerate(shard_sizes):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as writer:
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
                writer.write({"__key__": f"{shard:05d}{i:04d}", "jpg": buffer.getvalue()})
    return str(directory)


def _last_logged_step(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return 0
    steps = [int(r["step"]) for r in read_step_csv(path) if r["step"].isdigit()]
    return max(steps, default=0)


def _job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True)
    return out.stdout.strip()


def _wait(predicate, what: str, job_id: str, run_dir, deadline: float) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            logs = os.path.join(run_dir, "submitit")
            tail = ""
            for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
                if name.endswith((".err", ".out")):
                    tail += f"\n--- {name}\n" + Path(os.path.join(logs, name)).read_text()[-2000:]
            pytest.fail(f"timed out waiting for {what}; job {job_id} state {_job_state(job_id)!r}{tail}")
        time.sleep(0.5)


@pytest.mark.parametrize("interruption", ["scontrol-requeue", "usr2-warning"])
def test_requeued_job_resumes_at_the_saved_step(tmp_path, interruption):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    pool = _make_pool(tmp_path / "pool", [48, 48])  # 96 samples: 6 batches of 8 per rank per epoch
    run_dir = tmp_path / "run"
    # Under USR2 no periodic checkpoint is due before the end: resuming past step 0 proves the
    # job checkpointed on the signal.
    checkpoint_every = 4 if interruption == "scontrol-requeue" else 1000
    cfg = load_config(
        None,
        dict(
            data=pool,
            out=str(run_dir),
            steps=STEPS,
            batch_size=8,
            image_size=16,
            width=8,
            log_every=1,
            checkpoint_every=checkpoint_every,
            sample_log=True,
            cycle_steps=16,
        ),
        preset="fast",
    )
    info = launch_pretrain(
        cfg,
        executor="slurm",
        shape=JobShape(nodes=2, tasks_per_node=1, partition="debug", time_min=10),
        wait=False,
    )
    job_id = info["job_id"]
    deadline = time.monotonic() + DEADLINE_S
    try:
        _wait(
            lambda: _last_logged_step(run_dir) >= REQUEUE_AFTER_STEP,
            f"step {REQUEUE_AFTER_STEP}",
            job_id,
            run_dir,
            deadline,
        )
        step_at_requeue = _last_logged_step(run_dir)
        assert step_at_requeue < STEPS, "training finished before it could be requeued; raise STEPS"
        if interruption == "scontrol-requeue":
            subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
        else:  # what `--signal=USR2@120` does two minutes before the time limit
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True, capture_output=True)

        # A requeued job waits (BeginTime) before it may start again; let it start now.
        _wait(
            lambda: _job_state(job_id).startswith("PENDING"), "the job to be pending again", job_id, run_dir, deadline
        )
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)
        _wait(lambda: (run_dir / "summary.json").exists(), "the requeued job to finish", job_id, run_dir, deadline)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)

    summary = json.loads((run_dir / "summary.json").read_text())
    attempts = summary["attempts"]
    assert [a["slurm_job_id"] for a in attempts] == [job_id, job_id]
    assert [a["slurm_restart_count"] for a in attempts] == [0, 1]
    resumed = attempts[1]["start_step"]
    # Not restarted: it continues from a checkpoint at least as late as the last one written
    # before the requeue (a periodic one, or the one SIGTERM triggers).
    assert attempts[0]["start_step"] == 0
    if interruption == "scontrol-requeue":
        assert step_at_requeue // cfg.checkpoint_every * cfg.checkpoint_every <= resumed < STEPS
    else:
        assert step_at_requeue <= resumed < STEPS
    assert summary["resumed_from_step"] == resumed and summary["steps"] == STEPS
    assert summary["world_size"] == 2 and {r["hostname"] for r in summary["ranks"]} and len(summary["ranks"]) == 2

    # Not skipped: every step logged exactly once (rows the first job logged past its checkpoint
    # were dropped and redone), with the learning rate and image size of that step.
    plan = AccelerationPlan.from_config(cfg)
    rows = read_step_csv(str(run_dir / "metrics.csv"))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        step = int(r["step"])
        assert float(r["lr"]) == pytest.approx(plan.lr(step - 1), rel=1e-5, abs=1e-9)
        assert int(r["image_size"]) == plan.image_size_at(step - 1)

    # Same data position: each rank trained on one batch per step, and across both jobs every
    # sample was used exactly once in each complete epoch.
    by_epoch = defaultdict(list)
    for rank in range(2):
        sample_rows = read_step_csv(str(run_dir / samples_filename(rank)))
        assert [int(r["step"]) for r in sample_rows] == list(range(1, STEPS + 1))
        for r in sample_rows:
            by_epoch[int(r["epoch"])] += r["ids"].split()
    batches_per_epoch = summary["batches_per_epoch"]
    assert batches_per_epoch == 6
    complete = STEPS // batches_per_epoch
    assert sorted(by_epoch) == list(range(complete + 1))
    for epoch in range(complete):
        assert len(by_epoch[epoch]) == len(set(by_epoch[epoch])) == 96, epoch
    assert len(by_epoch[complete]) == len(set(by_epoch[complete])) == (STEPS % batches_per_epoch) * 16
