"""training/bootstrap: the schedule sized to the subset and checkpoint choice by target retrieval."""

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sept.data.targets import load_target
from sept.training.bootstrap import (
    BOOTSTRAP_MAX_STEPS,
    BOOTSTRAP_MIN_STEPS,
    RETRIEVAL_LOG_FILENAME,
    bootstrap,
    bootstrap_steps,
    checkpoint_to_keep,
    target_probe,
)
from sept.training.encoder import load_encoder

torch.set_num_threads(1)

COLOURS = [(220, 40, 40), (40, 40, 220), (40, 200, 40)]


def _image(colour, rng, size=16):
    a = np.clip(np.asarray(colour)[None, None] + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for shard in range(2):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as writer:
            for i in range(16):
                buffer = io.BytesIO()
                _image(COLOURS[i % 3], rng).save(buffer, "JPEG")
                writer.write({"__key__": f"{shard:05d}{i:04d}", "jpg": buffer.getvalue(), "json": b"{}"})
    return str(root)


def _target(root, per_split):
    rng = np.random.default_rng(1)
    for split, n in per_split.items():
        for label in ("blue", "red"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(COLOURS[0] if label == "red" else COLOURS[1], rng).save(folder / f"{i}.png")
    return str(root)


def test_default_schedule_is_sized_to_the_subset():
    assert bootstrap_steps(6400, 64, epochs=10) == 1000
    assert bootstrap_steps(640, 64, epochs=10) == BOOTSTRAP_MIN_STEPS
    assert bootstrap_steps(10**7, 64) == BOOTSTRAP_MAX_STEPS
    assert bootstrap_steps(3000, 64, epochs=4) == 4 * (3000 // 64)


def test_checkpoint_to_keep_prefers_later_steps_within_the_probe_noise():
    # 100 probe images at best 0.5: two standard errors are 0.1.
    assert checkpoint_to_keep([(0, 0.30), (10, 0.50), (20, 0.41)], 100) == 20
    assert checkpoint_to_keep([(0, 0.30), (10, 0.50), (20, 0.39)], 100) == 10
    assert checkpoint_to_keep([(0, 0.70), (10, 0.50), (20, 0.40)], 100) == 0
    assert checkpoint_to_keep([(0, 0.4), (10, 0.4)], 10) == 10  # ties: the later
    # A tiny probe cannot overrule training: 10 images at 0.6 give a margin of 0.31.
    assert checkpoint_to_keep([(0, 0.60), (10, 0.30)], 10) == 10
    assert checkpoint_to_keep([(0, 1.0), (10, 0.9)], 10) == 0  # a perfect score has no noise


def test_bootstrap_keeps_the_weights_that_retrieve_best(pool, tmp_path):
    target = _target(tmp_path / "target", {"train": 3, "val": 2})
    out = str(tmp_path / "enc.pt")
    bootstrap(
        pool,
        out,
        sample_size=16,
        steps=4,
        batch_size=8,
        image_size=16,
        width=4,
        min_shards=2,
        target=target,
        eval_every=2,
    )
    with open(out + ".bootstrap/" + RETRIEVAL_LOG_FILENAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    scores = [(int(r["step"]), float(r["knn_precision"])) for r in rows]
    kept = [int(r["step"]) for r in rows if r["kept"] == "1"]
    probe = target_probe(load_target(target), image_size=16)
    assert kept == [checkpoint_to_keep(scores, len(probe.labels))]
    bundle = load_encoder(out, device="cpu")
    assert bundle.extra["steps"] == kept[0] and bundle.extra["trained_steps"] == 4
    assert bundle.extra["stage"] == "bootstrap" and [s for s, _ in bundle.extra["retrieval_scores"]] == [0, 2, 4]
    # The file holds the kept weights: they score what the log says they scored.
    assert probe.score(bundle.model) == pytest.approx(dict(scores)[kept[0]], abs=1e-6)


def test_bootstrap_without_a_usable_target_keeps_the_last_weights(pool, tmp_path):
    target = _target(tmp_path / "target", {"train": 1})  # one image per class: nothing to retrieve
    out = str(tmp_path / "enc.pt")
    bootstrap(pool, out, sample_size=16, steps=2, batch_size=8, image_size=16, width=4, min_shards=2, target=target)
    assert not os.path.exists(out + ".bootstrap/" + RETRIEVAL_LOG_FILENAME)
    assert load_encoder(out, device="cpu").extra["steps"] == 2


def test_bootstrap_sizes_its_schedule_when_nobody_gives_steps(pool, tmp_path, monkeypatch):
    import sept.training.bootstrap as module

    monkeypatch.setattr(module, "BOOTSTRAP_MIN_STEPS", 3)  # a short run; the rule is what is tested
    monkeypatch.setattr(module, "BOOTSTRAP_EPOCHS", 2)
    out = str(tmp_path / "enc.pt")
    bootstrap(pool, out, sample_size=16, batch_size=8, image_size=16, width=4, min_shards=2)
    summary = json.loads(Path(out + ".bootstrap/summary.json").read_text())
    assert summary["steps"] == bootstrap_steps(16, 8) == 4


def test_bootstrap_centres_the_features_on_its_subset(pool, tmp_path):
    from sept.data.shards import list_shards
    from sept.training.bootstrap import feature_center, sample_pool
    from sept.training.encoder import EncoderBundle

    out = str(tmp_path / "enc.pt")
    bootstrap(pool, out, sample_size=16, steps=2, batch_size=8, image_size=16, width=4, min_shards=2, seed=5)
    bundle = load_encoder(out, device="cpu")
    assert bundle.center is not None and bundle.extra["center_of"] == 16
    items, _, _ = sample_pool(list_shards(pool), 16, seed=5, min_shards=2)
    raw = EncoderBundle(
        model=bundle.model,
        arch=bundle.arch,
        image_size=16,
        mean=bundle.mean,
        std=bundle.std,
        dim=bundle.dim,
        identity="",
        device=torch.device("cpu"),
    )
    np.testing.assert_allclose(bundle.center.numpy(), feature_center(raw, items), rtol=1e-5, atol=1e-6)
    # Off: no centre.
    plain = str(tmp_path / "plain.pt")
    bootstrap(
        pool,
        plain,
        sample_size=16,
        steps=2,
        batch_size=8,
        image_size=16,
        width=4,
        min_shards=2,
        seed=5,
        center_features=False,
    )
    assert load_encoder(plain, device="cpu").center is None
