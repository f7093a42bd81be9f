"""Encoder evaluation on a labelled target task: linear probe and weighted kNN accuracy on frozen
features, and optionally full fine-tuning (``sept.training.finetune``).

Features are the encoder's L2-normalised embeddings (``EncoderBundle.embed``). The linear probe
is scikit-learn's logistic regression fitted on the train split (its C chosen on a held-out part
of train); the kNN classifier is the temperature-weighted cosine vote of Wu et al. (2018) used
by DINO, k=20, T=0.07. All report accuracy on the val split.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from sept.data.targets import TargetTask, load_target
from sept.errors import SeptError
from sept.training.encoder import EncoderBundle, load_encoder

log = logging.getLogger(__name__)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Accuracy of a k-nearest-neighbour vote on cosine similarity (features L2-normalised):
    each of the k nearest train samples votes for its class with weight exp(similarity / T)."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, len(train_labels))
    correct = 0
    for start in range(0, len(val_labels), chunk):
        similarity = val_features[start : start + chunk] @ train_features.T  # (b, n_train)
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
        votes = np.zeros((len(similarity), num_classes), dtype=np.float64)
        np.add.at(votes, (np.arange(len(similarity))[:, None], train_labels[nearest]), weights)
        correct += int((votes.argmax(axis=1) == val_labels[start : start + chunk]).sum())
    return correct / len(val_labels)


PROBE_C_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)
"""Inverse regularisation strengths tried by the linear probe when ``C`` is not given."""
CV_UP_TO = 1000
"""Train splits smaller than this choose ``C`` by 5-fold cross-validation, larger ones by one hold-out."""


def _fit_probe(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int) -> LogisticRegression:
    probe = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the accuracy is what is reported
        probe.fit(features, labels)
    return probe


def select_probe_c(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    grid: tuple[float, ...] = PROBE_C_GRID,
    max_iter: int = 2000,
    seed: int = 0,
) -> float:
    """The ``C`` of ``grid`` with the best mean accuracy over stratified folds of the train split
    (the first of equals; the middle of the grid when a class has a single image).

    Cross-validation rather than one held-out part because target tasks have few labels: at 10
    images per class a 20% hold-out scores each ``C`` on 2 images per class, and its pick moved
    the probe's accuracy between otherwise similar encoders (benchmarks/RESULTS.md). From
    ``CV_UP_TO`` train images on, one stratified 20% hold-out is large enough and 5 times cheaper."""
    labels = np.asarray(labels)
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        return grid[len(grid) // 2]
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    if len(labels) < CV_UP_TO:
        folds = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
    else:
        folds = StratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=seed)
    splits = list(folds.split(features, labels))
    scores = [
        np.mean(
            [
                (_fit_probe(features[fit], labels[fit], c, max_iter).predict(features[dev]) == labels[dev]).mean()
                for fit, dev in splits
            ]
        )
        for c in grid
    ]
    return grid[int(np.argmax(scores))]


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    C: float | None = None,
    max_iter: int = 2000,
) -> tuple[float, float]:
    """(accuracy, C) of multinomial logistic regression fitted on the frozen train features.

    Without ``C`` it is chosen by ``select_probe_c`` on the train split alone (unit-norm features
    have small coordinates, so the best regularisation varies a lot between encoders)."""
    if C is None:
        C = select_probe_c(train_features, train_labels, max_iter=max_iter)
    probe = _fit_probe(train_features, train_labels, C, max_iter)
    return float((probe.predict(val_features) == np.asarray(val_labels)).mean()), float(C)


def check_task(task: TargetTask, *, need_val: bool = True) -> None:
    """Raises ``SeptError`` for a task that cannot be scored: an empty train split, an empty val
    split (unless not ``need_val``), classes that differ between train and val, a single class."""
    if not task.train:
        raise SeptError(f"target task {task.name} has an empty train split")
    if not task.val and need_val:
        raise SeptError(f"target task {task.name} has an empty val split (evaluation needs val/)")
    train_classes = set(task.labels("train"))
    val_classes = set(task.labels("val")) if task.val else train_classes
    if train_classes != val_classes:

        def names(indices: set[int]) -> str:
            return ", ".join(task.classes[i] if 0 <= i < len(task.classes) else str(i) for i in sorted(indices))

        parts = []
        if val_classes - train_classes:
            parts.append(f"only in val: {names(val_classes - train_classes)}")
        if train_classes - val_classes:
            parts.append(f"only in train: {names(train_classes - val_classes)}")
        raise SeptError(f"target task {task.name}: classes differ between train and val ({'; '.join(parts)})")
    if len(train_classes) < 2:
        raise SeptError(f"target task {task.name} has a single class; accuracy needs at least two")


def open_encoder_and_task(
    encoder: str | EncoderBundle, target: str | TargetTask, *, device: str = "auto", need_val: bool = True
) -> tuple[EncoderBundle, TargetTask]:
    """The encoder (file or bundle) and the target task (directory or ``TargetTask``), the task
    checked by ``check_task``."""
    bundle = encoder if isinstance(encoder, EncoderBundle) else load_encoder(encoder, device=device)
    task = target if isinstance(target, TargetTask) else load_target(target)
    check_task(task, need_val=need_val)
    return bundle, task


def result_header(bundle: EncoderBundle, task: TargetTask) -> dict[str, Any]:
    """What a result of an encoder on a target starts with: which target, which encoder, the sizes."""
    return {
        "target": task.name,
        "encoder": bundle.identity,
        "arch": bundle.arch,
        "num_classes": len(task.classes),
        "num_train": len(task.train),
        "num_val": len(task.val),
    }


def evaluate(
    encoder: str | EncoderBundle,
    target: str | TargetTask,
    *,
    k: int = 20,
    temperature: float = 0.07,
    C: float | None = None,
    batch_size: int = 256,
    device: str = "auto",
    finetune: bool = False,
    finetune_epochs: int = 10,
) -> dict[str, Any]:
    """Linear-probe and kNN accuracy of a frozen encoder (file or bundle) on a target task
    (directory or ``TargetTask``), both on the val split; ``C`` fixes the probe's regularisation
    (default: chosen on train). With ``finetune``, also the val accuracy after fine-tuning the
    whole encoder for ``finetune_epochs`` epochs on train (``finetune`` in the result). Raises
    ``SeptError`` for a checkpoint that is not an encoder, an empty split or classes that differ
    between train and val."""
    bundle, task = open_encoder_and_task(encoder, target, device=device)
    train_labels = np.asarray(task.labels("train"), dtype=np.int64)
    val_labels = np.asarray(task.labels("val"), dtype=np.int64)
    train_images, val_images = task.load_images("train"), task.load_images("val")
    train_features = bundle.embed_images(train_images, batch_size=batch_size)
    val_features = bundle.embed_images(val_images, batch_size=batch_size)
    probe_accuracy, probe_c = linear_probe_accuracy(train_features, train_labels, val_features, val_labels, C=C)
    result = {
        **result_header(bundle, task),
        "linear_probe": probe_accuracy,
        "linear_probe_c": probe_c,
        "knn": knn_accuracy(train_features, train_labels, val_features, val_labels, k=k, temperature=temperature),
        "knn_k": min(k, len(train_labels)),
        "knn_temperature": temperature,
    }
    if finetune:
        from sept.training.finetune import finetune_accuracy

        tuned = finetune_accuracy(bundle, train_images, train_labels, val_images, val_labels, epochs=finetune_epochs)
        result["finetune"] = tuned["accuracy"]
        result["finetune_epochs"] = tuned["epochs"]
    log.info("%s on %s: linear probe %.4f, kNN %.4f", bundle.identity, task.name, result["linear_probe"], result["knn"])
    return result
