"""sept experiment on a tiny corpus with one seed: all three arms and the floor, a valid PNG; the
arms pre-train with the demo's method and preset (DetCon, fast)."""

import json
from pathlib import Path

import pytest
from conftest import REPO, run_sept
from PIL import Image

from sept.data.demo_corpus import make_demo_corpus

pytestmark = pytest.mark.integration


def test_tiny_experiment_writes_all_arms_and_plot(tmp_path):
    corpus = make_demo_corpus(
        str(tmp_path / "corpus"), pool_size=160, shards=2, target_train_per_class=2, target_val_per_class=2, seed=3
    )
    out = tmp_path / "exp"
    settings = tmp_path / "arms.yaml"
    settings.write_text("image_size: 24\ncrop_min_scale: 0.6\nsteps: 99\n")  # --pretrain-steps wins over steps
    run_sept(
        "experiment",
        "--pool",
        corpus.pool_spec,
        "--target",
        corpus.target_dir,
        "--out",
        str(out),
        "--seeds",
        "1",
        "--budget-fraction",
        "0.25",
        "--pretrain-steps",
        "4",
        "--bootstrap-steps",
        "4",
        "--batch-size",
        "16",
        "--truth",
        corpus.truth_path,
        "--truth-label",
        corpus.target_domain,
        "--method",
        "detcon",
        "--preset",
        "fast",
        "--pretrain-config",
        str(settings),
    )
    results = json.loads(Path(out / "results.json").read_text())
    arms = results["fractions"]["0.25"]["arms"]
    assert set(arms) == {"selected", "random", "full"}
    assert arms["selected"][0]["images"] == arms["random"][0]["images"] == 40
    assert arms["full"][0]["images"] == 160
    for runs in arms.values():
        assert 0.0 <= runs[0]["linear_probe"] <= 1.0
        assert [p["step"] for p in runs[0]["curve"]] == [1, 2, 3, 4]
    assert len(results["floor"]) == 1
    assert "selection_precision" in results["fractions"]["0.25"]
    with Image.open(out / "results.png") as img:
        img.verify()
    assert "no pre-training" in (out / "results.md").read_text()
    import yaml

    ran = yaml.safe_load(Path(out / "runs" / "selected-0.25-s0" / "config.yaml").read_text())
    assert (
        ran["method"] == "detcon_s" and ran["lr_schedule"] == "cyclic" and ran["progressive"] and ran["hard_positives"]
    )
    assert (ran["image_size"], ran["crop_min_scale"], ran["steps"]) == (24, 0.6, 4)
    from sept.training.encoder import load_encoder

    assert load_encoder(str(out / "untrained-s0.pt")).image_size == 24  # the floor is scored like the arms


def test_arms_and_seeds_go_to_slurm_as_one_job_array(tmp_path):
    from conftest import slurm_available

    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    corpus = make_demo_corpus(
        str(tmp_path / "corpus"), pool_size=96, shards=2, target_train_per_class=2, target_val_per_class=2, seed=4
    )
    out = tmp_path / "exp"
    args = [
        "experiment",
        "--pool",
        corpus.pool_spec,
        "--target",
        corpus.target_dir,
        "--out",
        str(out),
        "--seeds",
        "2",
        "--arms",
        "selected",
        "random",
        "--budget-fraction",
        "0.25",
        "--pretrain-steps",
        "3",
        "--bootstrap-steps",
        "2",
        "--batch-size",
        "8",
        "--executor",
        "slurm",
    ]
    run_sept(*args)
    results = json.loads(Path(out / "results.json").read_text())
    runs = [r for arm in results["fractions"]["0.25"]["arms"].values() for r in arm]
    assert len(runs) == 4 and all(r["steps"] == 3 for r in runs)
    arrays = {r["job_id"].split("_")[0] for r in runs}
    assert len(arrays) == 1, f"one sbatch for every arm and seed, got jobs {sorted(r['job_id'] for r in runs)}"
    array = arrays.pop()
    assert sorted(r["job_id"] for r in runs) == [f"{array}_{i}" for i in range(4)]
    # A rerun resumes: every arm is done, nothing is submitted again.
    run_sept(*args)
    again = json.loads(Path(out / "results.json").read_text())
    assert [r["job_id"] for a in again["fractions"]["0.25"]["arms"].values() for r in a] == [r["job_id"] for r in runs]


def test_the_demo_pretrains_with_the_settings_the_benchmarks_publish():
    """`sept demo`'s arms and the README's `--pretrain-config benchmarks/configs/demo-digits-16px.yaml`
    are one set of settings: a change to one that leaves the other behind fails here."""
    import os

    import yaml

    from sept.demo import DEMO_PRETRAIN, DemoConfig
    from sept.training.config import load_config

    path = os.path.join(REPO, "benchmarks", "configs", "demo-digits-16px.yaml")
    with open(path) as f:
        assert yaml.safe_load(f) == DEMO_PRETRAIN
    cfg = load_config(None, dict(DEMO_PRETRAIN, data="x"))
    assert (cfg.image_size, cfg.crop_min_scale, cfg.optimizer) == (16, 0.6, "adamw")
    demo = DemoConfig()
    assert demo.target_val_per_class >= 50 and demo.method == "simclr" and demo.preset is None


def test_an_arm_stopped_by_a_signal_says_so_instead_of_missing_its_encoder(tmp_path):
    from sept.errors import SeptError
    from sept.experiment import score_arm

    with pytest.raises(SeptError, match=r"stopped at step 7 on SIGTERM; rerun the same command to resume"):
        score_arm(str(tmp_path / "run"), str(tmp_path / "target"), {"interrupted": "SIGTERM", "steps": 7}, 10, 100)
