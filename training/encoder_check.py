"""`sept encoder-check`: does an encoder separate a target's classes better than trivial features?

Measured from the target task alone, before any pass over a pool: the encoder and each trivial
feature (``sept.training.trivial_features``) embed the target's train and val images, and two
kNN accuracies are taken on each (``sept.training.retrieval_metrics``): leave-one-out on train
(each train image's k nearest other train images vote), and val retrieved from train (each val
image's k nearest train images vote). Selection retrieves pool images near the target's train
images, so an encoder whose neighbours of a target image carry its class no more often than a
thumbnail's will not select that class better either.

The verdict reads the val number (train's when the task has no val split): images the
encoder's author cannot have tuned on, whereas a bootstrap encoder keeps the weights that
retrieve the train split best. The encoder is "no better" when it does not beat the best
trivial feature on it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sept.data.targets import TargetTask
from sept.errors import SeptError
from sept.training.encoder import EncoderBundle
from sept.training.evaluate import open_encoder_and_task, result_header
from sept.training.retrieval_metrics import knn_vote_accuracy, loo_knn_vote_accuracy
from sept.training.trivial_features import TRIVIAL_FEATURES

log = logging.getLogger(__name__)

ENCODER_ROW = "encoder"
TRAIN_LOO = "train_loo"
VAL = "val"
COLUMNS = {TRAIN_LOO: "train, leave-one-out", VAL: "val from train"}


@dataclass
class EncoderCheckConfig:
    """What `sept encoder-check` measures, and how it answers."""

    encoder: str = field(metadata={"help": "the encoder file to check (from sept bootstrap or sept import-encoder)"})
    target: str = field(metadata={"help": "target task: ImageFolder dir with train/ and, best, val/"})
    k: int = field(default=5, metadata={"help": "neighbours that vote"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    device: str = field(
        default="auto", metadata={"help": "where the encoder runs: cpu, cuda or auto (a GPU when there is one)"}
    )
    strict: bool = field(
        default=False, metadata={"help": "exit with status 2 when the encoder is no better than a trivial feature"}
    )
    json: bool = field(default=False, metadata={"help": "print the result as JSON instead of the table"})


def feature_scores(
    train: np.ndarray, train_labels: np.ndarray, val: np.ndarray | None, val_labels: np.ndarray | None, k: int
) -> dict[str, float]:
    """The check's two numbers for one feature's train (and val) rows; no val, no val number."""
    scores = {TRAIN_LOO: loo_knn_vote_accuracy(train, train_labels, k)}
    if val is not None and len(val):
        scores[VAL] = knn_vote_accuracy(train, train_labels, val, val_labels, k)
    return scores


def check_encoder(
    encoder: str | EncoderBundle,
    target: str | TargetTask,
    *,
    k: int = 5,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """The encoder's and every trivial feature's kNN accuracies on the target (module docstring),
    the chance level, and the verdict: ``no_better`` is True when the encoder's headline number
    does not beat the best trivial feature's. Raises ``SeptError`` for a file that is not an
    encoder, a target that is not a task, an empty train split, fewer than two train images or
    classes, or classes that differ between train and val."""
    bundle, task = open_encoder_and_task(encoder, target, device=device, need_val=False)
    train_labels = np.asarray(task.labels("train"), dtype=np.int64)
    val_labels = np.asarray(task.labels("val"), dtype=np.int64)
    if len(train_labels) < 2:
        raise SeptError(f"target task {task.name} has a single train image; leave-one-out needs two")
    train_images, val_images = task.load_images("train"), task.load_images("val")
    k = int(min(max(1, k), len(train_labels) - 1))
    features = {ENCODER_ROW: lambda images: bundle.embed_images(images, batch_size=batch_size), **TRIVIAL_FEATURES}
    scores = {
        name: feature_scores(make(train_images), train_labels, make(val_images) if val_images else None, val_labels, k)
        for name, make in features.items()
    }
    headline = VAL if val_images else TRAIN_LOO
    best_trivial = max(TRIVIAL_FEATURES, key=lambda name: scores[name][headline])  # the first of equals
    headline_labels = val_labels if val_images else train_labels
    margin = scores[ENCODER_ROW][headline] - scores[best_trivial][headline]
    result = {
        **result_header(bundle, task),
        "k": k,
        "scores": scores,
        "chance": {c: most_frequent_share(y) for c, y in ((TRAIN_LOO, train_labels), (VAL, val_labels)) if len(y)},
        "headline": headline,
        "best_trivial": best_trivial,
        "margin": margin,
        "noise": noise(scores[best_trivial][headline], len(headline_labels)),
        "no_better": margin <= 0,
    }
    log.info(
        "%s on %s: kNN accuracy (%s) %.3f, best trivial feature (%s) %.3f",
        bundle.identity[:12],
        task.name,
        COLUMNS[headline],
        scores[ENCODER_ROW][headline],
        best_trivial,
        scores[best_trivial][headline],
    )
    return result


def most_frequent_share(labels: np.ndarray) -> float:
    """The accuracy of always answering the most frequent class: the chance level of a vote."""
    return float(np.bincount(labels).max() / len(labels))


def noise(accuracy: float, n: int) -> float:
    """Two standard errors of an accuracy measured on ``n`` images: margins below it are noise."""
    return 2 * math.sqrt(max(accuracy * (1 - accuracy), 1 / n) / n)


def verdict(result: dict[str, Any]) -> str:
    """One line: the warning when the encoder is no better than the best trivial feature, else
    how far ahead it is (and whether that is within the noise of the target's size)."""
    column = COLUMNS[result["headline"]]
    mine = result["scores"][ENCODER_ROW][result["headline"]]
    best = result["scores"][result["best_trivial"]][result["headline"]]
    if result["no_better"]:
        return (
            f"warning: the encoder is no better than the {result['best_trivial']} at telling the target's classes "
            f"apart (kNN accuracy, {column}: {mine:.3f} vs {best:.3f}); a selection with it is unlikely to beat "
            "one by that trivial feature. Try another checkpoint, centre it on the pool "
            "(import-encoder --center-pool), or bootstrap one (sept bootstrap --target)."
        )
    within = " (within the noise of this target's size: more labelled images would tell)"
    return (
        f"ok: the encoder beats the best trivial feature, the {result['best_trivial']}, by "
        f"{result['margin']:+.3f} (kNN accuracy, {column}: {mine:.3f} vs {best:.3f})"
        + (within if result["margin"] < result["noise"] else "")
    )


def format_check(result: dict[str, Any]) -> str:
    """The table of every feature's kNN accuracies, the chance level beneath."""
    columns = [c for c in COLUMNS if c in result["scores"][ENCODER_ROW]]
    rows = [(f"encoder ({result['arch']}, {result['encoder'][:12]})", result["scores"][ENCODER_ROW])]
    rows += [(name, result["scores"][name]) for name in TRIVIAL_FEATURES]
    rows.append(("chance (most frequent class)", result["chance"]))
    width = max(len(name) for name, _ in rows)
    header = f"{'features':<{width}}  " + "  ".join(f"{COLUMNS[c]:>20}" for c in columns)
    return "\n".join(
        [
            f"kNN accuracy (k={result['k']}, cosine, majority vote) on {result['target']}: "
            f"{result['num_classes']} classes, {result['num_train']} train and {result['num_val']} val images",
            header,
            *(f"{name:<{width}}  " + "  ".join(f"{s[c]:>20.3f}" for c in columns) for name, s in rows),
        ]
    )
