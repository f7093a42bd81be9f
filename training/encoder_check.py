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

Telling the target's classes apart is not what selection needs, though: selection precision
depends on telling the target's *domain* from the rest of the pool (on the icon benchmark the
class numbers ranked encoders in the reverse order of their precision, ``benchmarks/RESULTS.md``).
Given a pool, the check adds a third number, read by the verdict instead: a random sample of the
pool (``sample_pool``, as ``import-encoder --center-pool`` draws one) is embedded like the
target, and each train image, as selection's queries are, takes its k nearest among the val
images and the pool sample (``target_share_among_pool``); the number is the share of val images
among them. The val images stand for the pool's in-domain images, held out from every encoder's
tuning; the pool sample is what they must be found among. Without val, each train image's k
nearest among the other train images and the pool sample. Without the pool's truth it counts the
pool's own in-domain images near the target as misses, so it need not predict precision either
where the target's images differ in style from the pool's (the same RESULTS section). Every
feature embeds the pool sample
exactly as it embeds the target, and as selection sees the pool: an encoder's centre
(``EncoderBundle.embed_images``), the thumbnail's own mean removed per image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sept.data.targets import TargetTask
from sept.errors import SeptError
from sept.training.encoder import EncoderBundle
from sept.training.evaluate import open_encoder_and_task, result_header
from sept.training.retrieval_metrics import knn_vote_accuracy, loo_knn_vote_accuracy, target_share_among_pool
from sept.training.trivial_features import TRIVIAL_FEATURES

log = logging.getLogger(__name__)

ENCODER_ROW = "encoder"
TRAIN_LOO = "train_loo"
VAL = "val"
POOL = "pool"
COLUMNS = {TRAIN_LOO: "train, leave-one-out", VAL: "val from train", POOL: "target among pool"}


@dataclass
class EncoderCheckConfig:
    """What `sept encoder-check` measures, and how it answers."""

    encoder: str = field(metadata={"help": "the encoder file to check (from sept bootstrap or sept import-encoder)"})
    target: str = field(metadata={"help": "target task: ImageFolder dir with train/ and, best, val/"})
    k: int = field(default=5, metadata={"help": "neighbours that vote (and, with --pool, that are counted)"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    device: str = field(
        default="auto", metadata={"help": "where the encoder runs: cpu, cuda or auto (a GPU when there is one)"}
    )
    strict: bool = field(
        default=False, metadata={"help": "exit with status 2 when the encoder is no better than a trivial feature"}
    )
    json: bool = field(default=False, metadata={"help": "print the result as JSON instead of the table"})
    pool: str | None = field(
        default=None,
        metadata={
            "help": "a pool spec (shards, brace pattern, folder or listing): add the target-vs-pool number, "
            "each train image's share of val images among its k nearest in the val images and a random "
            "pool sample, and judge the encoder by it"
        },
    )
    pool_samples: int = field(default=1000, metadata={"help": "pool images to sample with --pool"})


def feature_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    val: np.ndarray | None,
    val_labels: np.ndarray | None,
    k: int,
    pool: np.ndarray | None = None,
) -> dict[str, float]:
    """The check's numbers for one feature's train (and val, and pool sample) rows: no val, no val
    number; no pool, no target-vs-pool number."""
    has_val = val is not None and len(val) > 0
    scores = {TRAIN_LOO: loo_knn_vote_accuracy(train, train_labels, k)}
    if has_val:
        scores[VAL] = knn_vote_accuracy(train, train_labels, val, val_labels, k)
    if pool is not None:
        scores[POOL] = target_share_among_pool(train, val if has_val else None, pool, k)
    return scores


def pool_sample(pool: str, samples: int) -> list[tuple[int, str, str, bytes]]:
    """A random sample of ``samples`` pool images, as ``sample_pool`` gives it (seed 0, as
    ``import-encoder --center-pool`` draws its sample). Raises ``SeptError`` naming the pool when
    it matches no shard or a shard cannot be read."""
    from sept.data.shards import list_shards
    from sept.training.bootstrap import sample_pool

    if samples < 1:
        raise SeptError(f"--pool-samples must be positive, got {samples}")
    return sample_pool(list_shards(pool), samples, seed=0)[0]


def pool_sample_images(pool: str, samples: int) -> list[Image.Image]:
    """The images of ``pool_sample`` that decode. Raises ``SeptError`` naming the pool when none does."""
    from sept.training.bootstrap import decodable_images

    images = decodable_images(pool_sample(pool, samples))
    if not images:
        raise SeptError(f"pool {pool} holds no decodable image to check the encoder against")
    return images


def check_encoder(
    encoder: str | EncoderBundle,
    target: str | TargetTask,
    *,
    k: int = 5,
    batch_size: int = 256,
    device: str = "auto",
    pool: str | None = None,
    pool_samples: int = 1000,
) -> dict[str, Any]:
    """The encoder's and every trivial feature's kNN accuracies on the target (module docstring),
    with a ``pool`` spec also their target-vs-pool share on ``pool_samples`` pool images, the
    chance levels, and the verdict: ``no_better`` is True when the encoder's headline number (the
    target-vs-pool share when there is a pool) does not beat the best trivial feature's. Raises
    ``SeptError`` for a file that is not an encoder, a target that is not a task, an empty train
    split, fewer than two train images or classes, classes that differ between train and val, or a
    pool that cannot be read."""
    bundle, task = open_encoder_and_task(encoder, target, device=device, need_val=False)
    pool_images = pool_sample_images(pool, pool_samples) if pool is not None else None
    train_labels = np.asarray(task.labels("train"), dtype=np.int64)
    val_labels = np.asarray(task.labels("val"), dtype=np.int64)
    if len(train_labels) < 2:
        raise SeptError(f"target task {task.name} has a single train image; leave-one-out needs two")
    train_images, val_images = task.load_images("train"), task.load_images("val")
    k = int(min(max(1, k), len(train_labels) - 1))
    features = {ENCODER_ROW: lambda images: bundle.embed_images(images, batch_size=batch_size), **TRIVIAL_FEATURES}
    scores = {
        name: feature_scores(
            make(train_images),
            train_labels,
            make(val_images) if val_images else None,
            val_labels,
            k,
            make(pool_images) if pool_images else None,
        )
        for name, make in features.items()
    }
    chance = {c: most_frequent_share(y) for c, y in ((TRAIN_LOO, train_labels), (VAL, val_labels)) if len(y)}
    if pool_images:
        targets = len(val_images) or len(train_images) - 1  # without val, the other train images
        chance[POOL] = targets / (targets + len(pool_images))
    headline = POOL if pool_images else VAL if val_images else TRAIN_LOO
    best_trivial = max(TRIVIAL_FEATURES, key=lambda name: scores[name][headline])  # the first of equals
    # The target-vs-pool share averages over the train images, as the class numbers over theirs.
    headline_count = len(val_labels) if headline == VAL else len(train_labels)
    margin = scores[ENCODER_ROW][headline] - scores[best_trivial][headline]
    result = {
        **result_header(bundle, task),
        "k": k,
        "pool": pool,
        "num_pool_samples": len(pool_images) if pool_images else 0,
        "scores": scores,
        "chance": chance,
        "headline": headline,
        "best_trivial": best_trivial,
        "margin": margin,
        "noise": noise(scores[best_trivial][headline], headline_count),
        "no_better": margin <= 0,
    }
    log.info(
        "%s on %s: %s %.3f, best trivial feature (%s) %.3f",
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


def _what_was_measured(result: dict[str, Any]) -> tuple[str, str]:
    """What the headline number says the encoder is good at, and what the number is."""
    if result["headline"] == POOL:
        targets = "val images" if result["num_val"] else "other train images"
        return "at finding the target among the pool", f"share of {targets} among the train images' nearest"
    return "at telling the target's classes apart", "kNN accuracy"


def verdict(result: dict[str, Any]) -> str:
    """One line: the warning when the encoder is no better than the best trivial feature, else
    how far ahead it is (and whether that is within the noise of the target's size)."""
    column = COLUMNS[result["headline"]]
    mine = result["scores"][ENCODER_ROW][result["headline"]]
    best = result["scores"][result["best_trivial"]][result["headline"]]
    good_at, number = _what_was_measured(result)
    if result["no_better"]:
        return (
            f"warning: the encoder is no better than the {result['best_trivial']} {good_at} "
            f"({number}, {column}: {mine:.3f} vs {best:.3f}); a selection with it is unlikely to beat "
            "one by that trivial feature. Try another checkpoint, centre it on the pool "
            "(import-encoder --center-pool), or bootstrap one (sept bootstrap --target)."
        )
    within = " (within the noise of this target's size: more labelled images would tell)"
    return (
        f"ok: the encoder beats the best trivial feature, the {result['best_trivial']}, by "
        f"{result['margin']:+.3f} {good_at} ({number}, {column}: {mine:.3f} vs {best:.3f})"
        + (within if result["margin"] < result["noise"] else "")
    )


def format_check(result: dict[str, Any]) -> str:
    """The table of every feature's numbers, the chance levels beneath."""
    columns = [c for c in COLUMNS if c in result["scores"][ENCODER_ROW]]
    rows = [(f"encoder ({result['arch']}, {result['encoder'][:12]})", result["scores"][ENCODER_ROW])]
    rows += [(name, result["scores"][name]) for name in TRIVIAL_FEATURES]
    chance = "chance (most frequent class" + ("; target share of the rows searched)" if POOL in columns else ")")
    rows.append((chance, result["chance"]))
    width = max(len(name) for name, _ in rows)
    header = f"{'features':<{width}}  " + "  ".join(f"{COLUMNS[c]:>20}" for c in columns)
    lines = [
        f"kNN accuracy (k={result['k']}, cosine, majority vote) on {result['target']}: "
        f"{result['num_classes']} classes, {result['num_train']} train and {result['num_val']} val images"
    ]
    if POOL in columns:
        targets = f"the {result['num_val']} val images" if result["num_val"] else "the other train images"
        lines.append(
            f"target among pool: the share of {targets} among each train image's {result['k']} nearest in them "
            f"and {result['num_pool_samples']} images sampled from {result['pool']} (the verdict reads it)"
        )
    return "\n".join(
        [
            *lines,
            header,
            *(f"{name:<{width}}  " + "  ".join(f"{s[c]:>20.3f}" for c in columns) for name, s in rows),
        ]
    )
