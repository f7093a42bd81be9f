"""`sept encoder-check`: the kNN vote accuracies and the target-vs-pool share against brute force, and
the command on the demo corpus."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_sept
from torch import nn

from sept.data.demo_corpus import make_demo_corpus
from sept.data.targets import load_target
from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, build_backbone, load_encoder, save_encoder
from sept.training.encoder_check import ENCODER_ROW, POOL, TRAIN_LOO, VAL, check_encoder
from sept.training.retrieval_metrics import (
    knn_precision,
    knn_vote_accuracy,
    loo_knn_vote_accuracy,
    majority_vote,
    nearest_neighbours,
    target_share_among_pool,
)
from sept.training.trivial_features import TRIVIAL_FEATURES

torch.set_num_threads(1)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(rng, classes, per_class, dim, spread):
    """Rows around one random centre per class, and their labels."""
    centres = rng.standard_normal((classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return _unit(centres[labels] + spread * rng.standard_normal((len(labels), dim))), labels


def _brute_force_vote(xq, xb, yb, k, exclude=None):
    """Python loops: sort by similarity (ties by row), count, tie to the label met first."""
    out = []
    for q, x in enumerate(xq):
        order = sorted((i for i in range(len(xb)) if i != (q if exclude else None)), key=lambda i: (-(x @ xb[i]), i))
        labels = [int(yb[i]) for i in order[:k]]
        counts = {c: labels.count(c) for c in labels}
        out.append(next(c for c in labels if counts[c] == max(counts.values())))
    return np.asarray(out)


def test_votes_match_brute_force():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 4, 12, 6, 1.5)
    xq, yq = _clusters(rng, 4, 5, 6, 1.5)
    for k in (1, 4, 5):
        loo = _brute_force_vote(x, x, y, k, exclude=True)
        assert loo_knn_vote_accuracy(x, y, k) == pytest.approx((loo == y).mean())
        val = _brute_force_vote(xq, x, y, k)
        assert knn_vote_accuracy(x, y, xq, yq, k) == pytest.approx((val == yq).mean())


def _brute_force_target_share(xq, xt, xp, k, leave_one_out):
    """Python loops: each query ranks targets then pool by similarity (ties by that order), itself
    left out when the queries are the targets; the share of targets among its k first."""
    rows = [("target", i, x) for i, x in enumerate(xt)] + [("pool", i, x) for i, x in enumerate(xp)]
    shares = []
    for q, x in enumerate(xq):
        order = sorted(
            (r for r in range(len(rows)) if not (leave_one_out and rows[r][:2] == ("target", q))),
            key=lambda r: (-(x @ rows[r][2]), r),
        )
        shares.append(sum(rows[r][0] == "target" for r in order[:k]) / k)
    return float(np.mean(shares))


def test_target_share_among_pool_matches_brute_force():
    rng = np.random.default_rng(3)
    x, _ = _clusters(rng, 3, 8, 6, 1.0)
    train, val, pool = x[::3], x[1::3], np.concatenate([x[2::3], _unit(rng.standard_normal((15, 6)))])
    for k in (1, 3, 5):
        assert target_share_among_pool(train, val, pool, k) == pytest.approx(
            _brute_force_target_share(train, val, pool, k, leave_one_out=False)
        )
        assert target_share_among_pool(train, None, pool, k) == pytest.approx(
            _brute_force_target_share(train, train, pool, k, leave_one_out=True)
        )
    # Targets apart from the pool are all found; targets drawn like the pool, at about their share.
    apart = _unit(np.eye(6)[0] + 0.1 * rng.standard_normal((10, 6)))
    elsewhere = _unit(-np.eye(6)[0] + 0.1 * rng.standard_normal((30, 6)))
    assert target_share_among_pool(apart[:4], apart[4:], elsewhere, 3) == 1.0
    assert target_share_among_pool(apart, None, elsewhere, 5) == 1.0
    noise = _unit(rng.standard_normal((700, 16)))
    assert 0.05 < target_share_among_pool(noise[:50], noise[50:150], noise[150:], 5) < 0.3  # chance 100/650
    with pytest.raises(ValueError):
        target_share_among_pool(train, val, pool[:, :3])


def test_separable_features_score_high_and_random_ones_at_chance():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 5, 40, 16, 0.1)
    assert loo_knn_vote_accuracy(x, y) == 1.0
    assert knn_vote_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    noise = _unit(rng.standard_normal((200, 16)))
    assert 0.05 < loo_knn_vote_accuracy(noise, y) < 0.35  # chance is 0.2
    assert 0.05 < knn_vote_accuracy(noise[::2], y[::2], noise[1::2], y[1::2]) < 0.35


def test_leave_one_out_never_counts_a_row_as_its_own_neighbour():
    # Each row's label is its own: only the row itself could vote for it.
    x = _unit(np.random.default_rng(2).standard_normal((10, 4)))
    y = np.arange(10)
    assert loo_knn_vote_accuracy(x, y, k=1) == 0.0
    assert knn_vote_accuracy(x, y, x, y, k=1) == 1.0  # val from train may find itself
    I = nearest_neighbours(x, x, 20, leave_one_out=True)
    assert I.shape == (10, 9) and not (I == y[:, None]).any()
    # Chunking the queries changes nothing.
    assert np.array_equal(I, nearest_neighbours(x, x, 20, leave_one_out=True, chunk=3))
    assert knn_precision(x, y, k=3) == 0.0


def test_majority_vote_breaks_ties_by_the_nearest_neighbour():
    assert majority_vote(np.array([[2, 1, 1, 2, 3]])).tolist() == [2]  # 2 vs 2 votes: 2 is nearer
    assert majority_vote(np.array([[1, 2, 2, 1, 2]])).tolist() == [2]  # a plain majority wins
    assert majority_vote(np.array([[3, 0, 1, 2]])).tolist() == [3]  # all tied: the nearest


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        loo_knn_vote_accuracy(np.ones((3, 2), np.float32), [0, 1])
    with pytest.raises(ValueError):
        loo_knn_vote_accuracy(np.ones((1, 2), np.float32), [0])


def test_trivial_features_are_unit_rows():
    from PIL import Image

    images = [Image.new("RGB", (20, 12), (i * 40, 255 - i * 40, 90)) for i in range(3)]
    images[0].putpixel((3, 3), (0, 0, 0))
    for make in TRIVIAL_FEATURES.values():
        rows = make(images)
        assert rows.dtype == np.float32 and len(rows) == 3
        np.testing.assert_allclose(np.linalg.norm(rows[:1], axis=1), 1.0, rtol=1e-5)


# --- the command on the demo corpus --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-check")
    corpus = make_demo_corpus(
        str(root / "corpus"), pool_size=40, shards=1, target_train_per_class=10, target_val_per_class=10, image_size=16
    )
    return root, corpus.target_dir, corpus.pool_spec


def _encoder(path, taught_on=None, steps=60):
    """A small ResNet, random (``taught_on`` None) or taught the classes of every labelled image of
    a target task, train and val: an encoder that certainly separates them, without a long run."""
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_small", width=8)
    kw = dict(arch="resnet18_small", image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if taught_on is not None:
        task = load_target(taught_on)
        bundle = load_encoder(save_encoder(path, backbone, **kw), device="cpu")
        x = torch.stack([bundle.preprocess(im) for im in task.load_images("train") + task.load_images("val")])
        y = torch.as_tensor(task.labels("train") + task.labels("val"))
        model = nn.Sequential(backbone, nn.Linear(dim, len(task.classes)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            batch = torch.randint(0, len(x), (32,))
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return save_encoder(path, backbone.eval(), **kw)


def test_command_ranks_a_taught_encoder_above_a_random_one_and_warns_on_the_random_one(demo):
    root, target, _ = demo
    random_enc = _encoder(str(root / "random.pt"))
    taught_enc = _encoder(str(root / "taught.pt"), taught_on=target)

    random_run = run_sept("encoder-check", "--encoder", random_enc, "--target", target, "--device", "cpu")
    assert "grayscale 16x16 thumbnail" in random_run.stdout and "val from train" in random_run.stdout
    # The random network's neighbours share a digit's class less often than the thumbnail's.
    assert "warning: the encoder is no better than the grayscale 16x16 thumbnail" in random_run.stderr
    strict = run_sept("encoder-check", "--encoder", random_enc, "--target", target, "--strict", check=False)
    assert strict.returncode == 2 and "is no better than" in strict.stderr.splitlines()[-1]

    taught = json.loads(run_sept("encoder-check", "--encoder", taught_enc, "--target", target, "--json").stdout)
    random_scores = check_encoder(random_enc, target, device="cpu")
    assert taught["headline"] == VAL and taught["num_train"] == taught["num_val"] == 100 and taught["k"] == 5
    assert taught["scores"][ENCODER_ROW][VAL] > random_scores["scores"][ENCODER_ROW][VAL] + 0.3
    assert not taught["no_better"] and random_scores["no_better"]
    # The trivial rows do not depend on the encoder.
    for name in TRIVIAL_FEATURES:
        assert taught["scores"][name] == random_scores["scores"][name]
    assert taught["chance"][TRAIN_LOO] == pytest.approx(0.1)


def test_command_names_the_bad_file(demo, tmp_path):
    _, target, _ = demo
    not_an_encoder = tmp_path / "notes.pt"
    not_an_encoder.write_text("not a checkpoint")
    proc = run_sept("encoder-check", "--encoder", str(not_an_encoder), "--target", target, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("sept encoder-check: error:")
    assert "notes.pt" in proc.stderr.strip().splitlines()[-1]
    encoder = _encoder(str(tmp_path / "random.pt"))
    missing = run_sept("encoder-check", "--encoder", encoder, "--target", str(tmp_path / "none"), check=False)
    assert missing.returncode == 2 and "none" in missing.stderr.strip().splitlines()[-1]


def test_a_target_without_val_is_judged_on_train(demo, tmp_path):
    _, target, _ = demo
    shutil.copytree(f"{target}/train", tmp_path / "train-only" / "train")
    result = check_encoder(_encoder(str(tmp_path / "random.pt")), str(tmp_path / "train-only"), device="cpu", k=50)
    assert result["headline"] == TRAIN_LOO and result["num_val"] == 0 and result["k"] == 50
    assert all(set(scores) == {TRAIN_LOO} for scores in result["scores"].values())
    assert result["no_better"] == (result["margin"] <= 0)


def test_command_with_a_pool_judges_by_the_target_among_the_pool(demo):
    root, target, pool = demo
    random_enc = _encoder(str(root / "random-pool.pt"))
    run = run_sept(
        "encoder-check", "--encoder", random_enc, "--target", target, "--pool", pool, "--pool-samples", "30", "--json"
    )
    result = json.loads(run.stdout)
    assert result["headline"] == POOL and result["num_pool_samples"] == 30
    assert all(set(scores) == {TRAIN_LOO, VAL, POOL} for scores in result["scores"].values())
    assert result["chance"][POOL] == pytest.approx(100 / 130)  # 100 val images among 30 pool images
    assert result["no_better"] == (result["margin"] <= 0)
    assert "among the pool" in run.stderr.strip().splitlines()[-1]
    # The class numbers are those of the check without a pool.
    plain = check_encoder(random_enc, target, device="cpu")
    for name, scores in plain["scores"].items():
        assert {c: result["scores"][name][c] for c in scores} == pytest.approx(scores)
    table = run_sept(
        "encoder-check", "--encoder", random_enc, "--target", target, "--pool", pool, "--pool-samples", "30"
    ).stdout
    assert "target among pool" in table and "30 images sampled from" in table


def test_a_bad_pool_is_named(demo, tmp_path):
    _, target, _ = demo
    encoder = _encoder(str(tmp_path / "random.pt"))
    missing = str(tmp_path / "nowhere" / "{00000..00001}.tar")
    proc = run_sept("encoder-check", "--encoder", encoder, "--target", target, "--pool", missing, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("sept encoder-check: error:") and "nowhere" in last
