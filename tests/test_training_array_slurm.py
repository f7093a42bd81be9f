"""Many pre-training runs (here two seeds) go to SLURM as one submitit job array, not one
submission each. Needs `bash slurm/dev-cluster.sh up` (skips otherwise)."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from conftest import slurm_available
from PIL import Image

from sept.errors import SeptError
from sept.training.config import load_config
from sept.training.job_shape import JobShape
from sept.training.launcher import launch_pretrain_array

pytestmark = pytest.mark.integration


def test_seeds_run_as_one_job_array(tmp_path):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    (tmp_path / "pool").mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "pool" / "00000.tar")) as writer:
        for i in range(24):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
            writer.write({"__key__": f"{i:04d}", "jpg": buffer.getvalue()})
    cfgs = [
        load_config(
            None,
            dict(
                data=str(tmp_path / "pool"),
                out=str(tmp_path / f"seed{s}"),
                steps=3,
                batch_size=8,
                image_size=16,
                width=8,
                seed=s,
            ),
        )
        for s in (0, 1)
    ]
    results = launch_pretrain_array(
        cfgs,
        log_folder=str(tmp_path / "submitit"),
        executor="slurm",
        shape=JobShape(partition="debug", time_min=5),
    )
    array_ids = {r["job_id"].split("_")[0] for r in results}
    assert len(array_ids) == 1 and [r["job_id"].split("_")[1] for r in results] == ["0", "1"]
    assert [r["run_dir"] for r in results] == [c.out for c in cfgs]
    for r, cfg in zip(results, cfgs):
        assert r["steps"] == 3 and json.loads((tmp_path / f"seed{cfg.seed}" / "summary.json").read_text())["steps"] == 3
    with pytest.raises(SeptError, match="its own out directory"):
        launch_pretrain_array([cfgs[0], cfgs[0]], log_folder=str(tmp_path / "x"), executor="slurm")
