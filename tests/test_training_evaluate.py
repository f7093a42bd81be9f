"""Evaluation: kNN and linear probe on frozen features, on a tiny ImageFolder of digits."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from sept.data.targets import TargetTask, load_target
from sept.errors import SeptError
from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, build_backbone, load_encoder, save_encoder
from sept.training.evaluate import CV_UP_TO, PROBE_C_GRID, evaluate, knn_accuracy, linear_probe_accuracy, select_probe_c

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """train/ and val/ ImageFolders of scikit-learn's bundled digits (4 classes, 16 px)."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits(n_class=4)
    for split, indices in (("train", range(0, 120)), ("val", range(120, 200))):
        for i in indices:
            folder = root / split / f"digit{digits.target[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16)).convert("RGB").save(folder / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_small", width=8)
    path = str(tmp_path_factory.mktemp("enc") / "enc.pt")
    return save_encoder(path, backbone, arch="resnet18_small", image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_knn_votes_by_weighted_neighbours():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1])
    val = np.array([[0.95, 0.05], [0.05, 0.95]], dtype=np.float32)
    val /= np.linalg.norm(val, axis=1, keepdims=True)
    assert knn_accuracy(train, labels, val, np.array([0, 1]), k=3) == 1.0
    assert knn_accuracy(train, labels, val, np.array([1, 0]), k=3) == 0.0
    # One near neighbour outweighs two far ones at a low temperature.
    far_majority = np.array([[1, 0], [-0.2, 1], [-0.3, 1]], dtype=np.float32)
    far_majority /= np.linalg.norm(far_majority, axis=1, keepdims=True)
    query = np.array([[1, 0.05]], dtype=np.float32) / np.linalg.norm([1, 0.05])
    assert knn_accuracy(far_majority, np.array([0, 1, 1]), query, np.array([0]), k=3, temperature=0.07) == 1.0


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8)
    labels = rng.integers(0, 3, 90)
    features = centers[labels] + 0.05 * rng.standard_normal((90, 8))
    accuracy, c = linear_probe_accuracy(features[:60], labels[:60], features[60:], labels[60:])
    assert accuracy == 1.0 and c > 0


def _few_label_features(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """4 classes told apart by dims 0-3, but dim 0 also carries a large nuisance that dim 4
    repeats: only a weakly regularised probe learns to subtract it. Small coordinates, as
    unit-norm features have."""
    labels = np.repeat(np.arange(4), per_class)
    x = np.eye(4, 6)[labels] + 0.2 * rng.standard_normal((len(labels), 6))
    nuisance = 3.0 * rng.standard_normal(len(labels))
    x[:, 0] += nuisance
    x[:, 4] = nuisance
    return 0.05 * x, labels


def test_probe_regularisation_is_chosen_by_cross_validation_on_few_labels():
    rng = np.random.default_rng(0)
    train, labels = _few_label_features(rng, 10)
    val, val_labels = _few_label_features(rng, 50)
    accuracy = {c: linear_probe_accuracy(train, labels, val, val_labels, C=c)[0] for c in PROBE_C_GRID}
    chosen = select_probe_c(train, labels)
    assert accuracy[chosen] >= max(accuracy.values()) - 0.05 and accuracy[chosen] > accuracy[PROBE_C_GRID[0]] + 0.3
    assert select_probe_c(train, labels) == chosen  # deterministic
    # Two images per class still give two folds; one image in a class leaves nothing to hold out.
    assert select_probe_c(train[::5], labels[::5]) in PROBE_C_GRID
    assert select_probe_c(train[:31], labels[:31]) == PROBE_C_GRID[len(PROBE_C_GRID) // 2]
    # A large train split is judged on one hold-out, and still picks a probe that works.
    many, many_labels = _few_label_features(rng, CV_UP_TO // 4)
    on_many = {c: linear_probe_accuracy(many, many_labels, val, val_labels, C=c)[0] for c in PROBE_C_GRID}
    assert on_many[select_probe_c(many, many_labels)] >= max(on_many.values()) - 0.05


def test_evaluate_on_an_image_folder(digits_folder, encoder_path):
    result = evaluate(encoder_path, digits_folder)
    assert (result["num_classes"], result["num_train"], result["num_val"]) == (4, 120, 80)
    assert result["encoder"] == load_encoder(encoder_path, device="cpu").identity
    # Even random conv features separate four digit classes far above chance (0.25).
    assert 0.5 < result["knn"] <= 1.0
    assert 0.5 < result["linear_probe"] <= 1.0


def test_class_mismatch_and_empty_splits_are_errors(digits_folder, encoder_path):
    bundle = load_encoder(encoder_path, device="cpu")
    good = load_target(digits_folder)
    no_val = TargetTask(name="t", classes=good.classes, train=good.train, val=[])
    with pytest.raises(SeptError, match="empty val split"):
        evaluate(bundle, no_val)
    no_train = TargetTask(name="t", classes=good.classes, train=[], val=good.val)
    with pytest.raises(SeptError, match="empty train split"):
        evaluate(bundle, no_train)
    val_missing_class = [(path, label) for path, label in good.val if label != 3]
    mismatch = TargetTask(name="t", classes=good.classes, train=good.train, val=val_missing_class)
    with pytest.raises(SeptError, match=r"classes differ between train and val \(only in train: digit3\)"):
        evaluate(bundle, mismatch)


def test_full_finetuning_trains_every_weight_and_leaves_the_encoder_alone(digits_folder, encoder_path):
    bundle = load_encoder(encoder_path, device="cpu")
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    result = evaluate(bundle, digits_folder, finetune=True, finetune_epochs=8)
    assert result["finetune_epochs"] == 8
    assert 0.6 < result["finetune"] <= 1.0  # four classes: chance is 0.25
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())
    assert "finetune" not in evaluate(bundle, digits_folder)


def test_a_checkpoint_that_is_not_an_encoder_is_an_error(digits_folder, tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"step": 3, "lr": 0.1}, path)
    with pytest.raises(SeptError, match=f"not an encoder checkpoint: {path}"):
        evaluate(str(path), digits_folder)
