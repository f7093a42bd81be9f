"""slurm/ray-cluster.sbatch on the two-node dev SLURM cluster: a Ray head on node1, a worker on
node2, and `sept embed` run against them; the job's exit status is the command's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import NODE_IP, VENV_BIN, slurm_available
from test_embed_pools import write_good_shard

from sept.index.embedding_store import EmbeddingStore
from sept.training.encoder import build_backbone, save_encoder

pytestmark = pytest.mark.integration

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm", "ray-cluster.sbatch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


def test_sbatch_starts_ray_on_both_nodes_and_runs_sept(tmp_path):
    reason = slurm_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_small", width=4)
    encoder = save_encoder(
        str(tmp_path / "enc.pt"), backbone, arch="resnet18_small", image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    for s in range(3):
        write_good_shard(str(tmp_path / f"pool-{s}.tar"), 10, seed=s)
    out, log = str(tmp_path / "emb.zarr"), str(tmp_path / "job.out")
    ray_temp = tempfile.mkdtemp(prefix="sept-sb-", dir="/tmp")  # short: unix socket paths are limited
    env = dict(
        os.environ,
        SEPT_VENV=os.path.dirname(VENV_BIN),
        SEPT_RAY_PORT=str(_free_port()),
        SEPT_RAY_NODE_IP=NODE_IP,
        SEPT_RAY_TEMP_DIR=ray_temp,
        SEPT_RAY_WAIT_S="120",
    )
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--nodes=2",
            "--partition=debug",
            f"--output={log}",
            "--time=10",
            SCRIPT,
            "sept",
            "embed",
            "--pool",
            str(tmp_path),
            "--encoder",
            encoder,
            "--out",
            out,
            "--workers",
            "2",
            "--batch-size",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    shutil.rmtree(ray_temp, ignore_errors=True)
    text = Path(log).read_text() if os.path.exists(log) else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{text[-5000:]}"
    assert "2 Ray node(s) up" in text
    summary = json.loads(text[text.index("{\n") : text.rindex("}") + 1])
    assert summary["complete"] == 3 and summary["vectors"] == 30
    assert len(EmbeddingStore.open(out).read_all()[1]) == 30
