"""SEPT step 1: self-supervised training of the retrieval encoder on a random subset of the pool.

The subset is a uniform random sample (reservoir sampling, seeded) of the samples in a random
choice of shards: at least ``min_shards`` of them, more until ``sample_size`` samples have been
seen, so the cost is bounded by the subset's size, not the pool's. The sampled images are
copied into one local WebDataset shard and trained on in this process (world size 1) with the
ordinary trainer; the encoder is written with ``sept.training.finalize.write_encoder``.

The encoder exists to retrieve, so the defaults (``BOOTSTRAP_DEFAULTS``) were chosen by
selection precision, not by loss, and the schedule is sized to the subset
(``bootstrap_steps``). Given a labelled ``target``, the bootstrap also scores the backbone's
kNN retrieval precision on the target's images as it trains (the untrained weights included)
and keeps the weights that retrieve best, not the last (``sept.training.retrieval_metrics``;
an earlier checkpoint must win by more than twice the probe's standard error, ``checkpoint_to_keep``).
Last, the mean feature of the subset is stored in the encoder as its centre
(``feature_center``), so every stage compares images by centred cosine similarity.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any

import numpy as np
import torch
import webdataset as wds
import yaml
from PIL import Image

from sept.data.decode import BadSample, decode_image
from sept.data.samples import ShardStats, image_member, iter_samples
from sept.data.shards import list_shards
from sept.errors import SeptError
from sept.io import atomic_file, atomic_target
from sept.training.checkpoint import CHECKPOINT_FILENAME
from sept.training.config import PretrainConfig, load_config
from sept.training.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderBundle,
    build_backbone,
    load_encoder,
)
from sept.training.finalize import write_encoder
from sept.training.retrieval_metrics import RetrievalProbe
from sept.training.trainer import train

log = logging.getLogger(__name__)

SUBSET_FILENAME = "bootstrap-subset.tar"
RETRIEVAL_LOG_FILENAME = "retrieval.csv"
BOOTSTRAP_EPOCHS = 30
"""Passes over the subset the default schedule makes (``bootstrap_steps``): enough that selection
precision has stopped rising on the benchmarks, at a cost bounded by the subset's size
(measured in benchmarks/RESULTS.md)."""
BOOTSTRAP_MIN_STEPS = 100
BOOTSTRAP_MAX_STEPS = 2000
BOOTSTRAP_DEFAULTS = {"optimizer": "adamw", "lr": 2e-3, "color_jitter": 1.0, "crop_min_scale": 0.5}
"""Bootstrap settings over ``PretrainConfig``'s defaults, chosen by round-robin selection precision
at a 10% budget on the demo corpus and the icon benchmark (benchmarks/RESULTS.md, "Retrieval
quality"). SGD at lr 0.05 retrieved worse than an untrained network (demo: 0.40 vs 0.59 at 150
steps), AdamW at 2e-3 better (0.64). Crops of at least half the image keep the global shape that
tells categories apart, and full-strength colour jitter stops instance discrimination from
leaning on colour: demo 0.71 -> 0.86 at 300 steps, icons 0.11 -> 0.20 at 300 steps."""
EVAL_POINTS = 10
"""How many times a bootstrap with a labelled target scores its backbone (plus the untrained one)."""
_RESERVED_KEYS = ("data", "out", "num_samples")


def bootstrap_steps(
    num_images: int,
    batch_size: int,
    *,
    epochs: float | None = None,
    min_steps: int | None = None,
    max_steps: int | None = None,
) -> int:
    """The default schedule: ``epochs`` passes over a subset of ``num_images``, in [min_steps, max_steps]
    (defaults: ``BOOTSTRAP_EPOCHS``, ``BOOTSTRAP_MIN_STEPS``, ``BOOTSTRAP_MAX_STEPS``)."""
    epochs = BOOTSTRAP_EPOCHS if epochs is None else epochs
    min_steps = BOOTSTRAP_MIN_STEPS if min_steps is None else min_steps
    max_steps = BOOTSTRAP_MAX_STEPS if max_steps is None else max_steps
    per_epoch = max(1, num_images // max(1, batch_size))
    return int(min(max_steps, max(min_steps, round(epochs * per_epoch))))


def sample_pool(
    shards: list[str], sample_size: int, *, seed: int = 0, min_shards: int = 16
) -> tuple[list[tuple[int, str, str, bytes]], int, int]:
    """A uniform random sample of ``sample_size`` images from randomly chosen shards.

    Returns ((listing index, key, image extension, image bytes) in read order, shards scanned,
    samples seen). Samples without an image member are not candidates.
    """
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, str, str, bytes]] = []
    seen = scanned = 0
    for shard_index in rng.permutation(len(shards)):
        if scanned >= min_shards and seen >= sample_size:
            break
        scanned += 1
        for sample in iter_samples(shards[shard_index], ShardStats()):
            found = image_member(sample)
            if found is None:
                continue
            item = (int(shard_index), sample.key, found[0], found[1])
            seen += 1
            if len(reservoir) < sample_size:
                reservoir.append(item)
            else:
                slot = int(rng.integers(seen))
                if slot < sample_size:
                    reservoir[slot] = item
    return reservoir, scanned, seen


def _write_subset(items: list[tuple[int, str, str, bytes]], path: str) -> None:
    with atomic_target(path) as tmp, wds.TarWriter(tmp) as writer:
        for shard_index, key, ext, data in items:
            # Pool keys are unique per img2dataset run; the shard prefix keeps them unique anyway.
            writer.write({"__key__": f"{shard_index:06d}_{key.replace('/', '_')}", ext: data})


def _config_file_keys(config: str | None) -> set[str]:
    if config is None:
        return set()
    try:
        with open(config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return set()  # load_config reports it, naming the file
    return set(loaded) if isinstance(loaded, dict) else set()


def target_probe(target: Any, *, image_size: int, k: int = 5) -> RetrievalProbe | None:
    """A ``RetrievalProbe`` of a target task's labelled images (train and val), or None when they
    cannot measure retrieval (fewer than two classes, or no class with two images)."""
    from sept.data.targets import TargetTask, load_target

    task = target if isinstance(target, TargetTask) else load_target(str(target))
    refs = task.train + task.val
    labels = np.asarray([label for _, label in refs])
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    if np.count_nonzero(counts) < 2 or counts.max() < 2:
        log.warning("target %s has too few labelled images to score retrieval; keeping the last weights", task.name)
        return None
    images = task.load_images("train") + task.load_images("val")
    return RetrievalProbe.from_images(images, labels, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, k=k)


CHOICE_STANDARD_ERRORS = 2.0
"""How many standard errors of the probe an earlier checkpoint must win by to be kept over a later one."""


def checkpoint_to_keep(scores: list[tuple[int, float]], probe_size: int) -> int:
    """The step to keep of (step, score) pairs in training order: the latest whose score is within
    ``CHOICE_STANDARD_ERRORS`` standard errors, sqrt(p(1-p)/n) at the best score p with n probe
    images, of the best score. A small probe is noisy: an earlier checkpoint must beat a later one
    clearly. (On the icon benchmark's 29 target images the scores wander between 0.50 and 0.63
    with no relation to selection precision; one standard error kept a mid-run checkpoint.)"""
    best = max(v for _, v in scores)
    margin = CHOICE_STANDARD_ERRORS * float(np.sqrt(best * (1.0 - best) / max(1, probe_size)))
    return [s for s, v in scores if v >= best - margin - 1e-12][-1]


def decodable_images(items: list[tuple[int, str, str, bytes]]) -> list[Image.Image]:
    """The images of ``sample_pool``'s items that decode, in order; the others are left out, as
    the embed stage skips them."""
    images = []
    for _, _, _, data in items:
        try:
            images.append(decode_image(data))
        except BadSample:
            continue
    return images


def feature_center(
    bundle: EncoderBundle, items: list[tuple[int, str, str, bytes]], batch_size: int = 256
) -> np.ndarray:
    """The mean L2-normalised feature (dim,) of the subset's images under ``bundle`` (which must
    have no centre yet); undecodable images are left out. The pool's own mean direction is what
    all its features share, so removing it is what lets cosine similarity tell images apart."""
    total = np.zeros(bundle.dim, dtype=np.float64)
    count = 0
    for start in range(0, len(items), batch_size):  # decoded a chunk at a time: the subset can be large
        images = decodable_images(items[start : start + batch_size])
        if images:
            total += bundle.embed_images(images, batch_size=batch_size).sum(axis=0)
            count += len(images)
    if count == 0:
        raise SeptError("no image of the bootstrap subset could be decoded to centre the features")
    return (total / count).astype(np.float32)


class _BestWeights:
    """Scores the backbone every ``every`` steps and at ``last`` and keeps the weights to write.

    The weights kept are those of ``checkpoint_to_keep``. Only checkpoints that score higher
    than every later one can ever be kept, so only those are held (on CPU)."""

    def __init__(self, probe: RetrievalProbe, every: int, last: int):
        self.probe, self.every, self.last = probe, max(1, every), last
        self.scores: list[tuple[int, float]] = []
        self._candidates: list[tuple[int, float, dict]] = []  # scores strictly decreasing

    def __call__(self, step: int, backbone: torch.nn.Module) -> None:
        if step % self.every and step != self.last:
            return
        score = self.probe.score(backbone)
        self.scores.append((step, score))
        log.info("bootstrap step %d: target kNN retrieval precision %.4f", step, score)
        while self._candidates and self._candidates[-1][1] <= score:
            self._candidates.pop()
        state = {k: v.detach().to("cpu").clone() for k, v in backbone.state_dict().items()}
        self._candidates.append((step, score, state))

    def kept(self) -> tuple[int, float, dict]:
        """(step, score, weights) of the checkpoint to write (``checkpoint_to_keep``)."""
        step = checkpoint_to_keep([(s, v) for s, v, _ in self._candidates], len(self.probe.labels))
        return next(c for c in self._candidates if c[0] == step)

    def write_log(self, path: str) -> None:
        kept_step = self.kept()[0]
        with atomic_file(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "knn_precision", "kept"])
            writer.writerows([s, f"{v:.6f}", int(s == kept_step)] for s, v in self.scores)


def bootstrap(
    pool_spec: str,
    out_path: str,
    *,
    sample_size: int = 2000,
    steps: int | None = None,
    seed: int | None = None,
    config: str | None = None,
    min_shards: int = 16,
    work_dir: str | None = None,
    target: Any = None,
    eval_every: int | None = None,
    center_features: bool = True,
    **overrides: Any,
) -> str:
    """Trains a retrieval encoder on a random ``sample_size`` subset of the pool; returns ``out_path``.

    Training settings are ``PretrainConfig`` fields: ``BOOTSTRAP_DEFAULTS``, then the YAML
    ``config`` file, then ``steps``, ``seed`` (also the subset's seed) and ``overrides``
    (method, arch, image_size, batch_size, lr, ...), each where given. Without a step count from
    any of them the schedule is ``bootstrap_steps`` of the subset. ``data``, ``out`` and
    ``num_samples`` are set here, not by the caller.

    ``target`` (a target task directory or ``TargetTask``) turns on checkpoint choice: every
    ``eval_every`` steps (default: ``EVAL_POINTS`` times per run) and before the first step, the
    backbone's leave-one-out kNN precision on the target's labelled images is measured, and the
    encoder written is the one ``checkpoint_to_keep`` picks (the best, unless a later one is
    within the probe's noise of it); the scores go to ``work_dir/retrieval.csv`` and the
    encoder's provenance.

    ``center_features`` stores the mean normalised feature of the subset in the encoder, which
    ``EncoderBundle.embed`` then subtracts (``feature_center``).

    The run's files (config, metrics, summary) stay in ``work_dir`` (default
    ``OUT_PATH.bootstrap/``); the subset shard and the checkpoint are removed once the encoder
    is written.
    """
    if sample_size < 1:
        raise SeptError(f"bootstrap sample size must be at least 1, got {sample_size}")
    if eval_every is not None and eval_every < 1:
        raise SeptError(f"bootstrap eval_every must be at least 1, got {eval_every}")
    out_path = os.path.abspath(out_path)
    work_dir = os.path.abspath(work_dir or out_path + ".bootstrap")
    for reserved in _RESERVED_KEYS:
        if reserved in overrides:
            raise SeptError(f"bootstrap sets config key {reserved!r} itself; do not override it")
    overrides = {**overrides, "steps": steps, "seed": seed}
    steps_given = steps is not None or "steps" in _config_file_keys(config)

    def resolve(fixed: dict[str, Any]):
        return load_config(config, {**overrides, **fixed}, base=BOOTSTRAP_DEFAULTS)

    cfg = resolve({"out": work_dir})  # fail on a bad setting before reading the pool
    if config is not None:
        from_file = load_config(config)
        if from_file.data or from_file.num_samples is not None or from_file.out != PretrainConfig.out:
            log.warning("bootstrap ignores data, out and num_samples of %s: it trains on its own pool subset", config)
    probe = target_probe(target, image_size=cfg.image_size) if target is not None else None

    shards = list_shards(pool_spec)
    items, scanned, seen = sample_pool(shards, sample_size, seed=cfg.seed, min_shards=min_shards)
    if not items:
        raise SeptError(f"pool {pool_spec} has no sample with an image in the {scanned} shards read")
    if len(items) < cfg.batch_size:
        raise SeptError(
            f"bootstrap subset of pool {pool_spec} has {len(items)} images, fewer than one batch of {cfg.batch_size}"
        )
    log.info("bootstrap subset: %d of %d samples seen in %d of %d shards", len(items), seen, scanned, len(shards))
    os.makedirs(work_dir, exist_ok=True)
    subset = os.path.join(work_dir, SUBSET_FILENAME)
    _write_subset(items, subset)

    fixed: dict[str, Any] = {"out": work_dir, "data": subset, "num_samples": len(items)}
    if not steps_given:
        fixed["steps"] = bootstrap_steps(len(items), cfg.batch_size)
    cfg = resolve(fixed)
    log.info("bootstrap: %d steps of %s, batch %d, on %d images", cfg.steps, cfg.method, cfg.batch_size, len(items))
    extra: dict[str, Any] = {
        "stage": "bootstrap",
        "data": str(pool_spec),  # the subset shard is temporary; the pool is the provenance
        "sample_size": len(items),
        "shards_scanned": scanned,
        "samples_seen": seen,
    }
    keeper = None
    if probe is not None:
        keeper = _BestWeights(probe, eval_every or max(1, cfg.steps // EVAL_POINTS), cfg.steps)
        torch.manual_seed(cfg.seed)  # the trainer's own initial weights, so they compete too
        untrained, _ = build_backbone(cfg.arch, width=cfg.width)
        keeper(0, untrained)
    summary = train(cfg, distributed_run=False, encoder_path=out_path, encoder_extra=extra, step_callback=keeper)
    if "interrupted" in summary:
        # The subset and the checkpoint stay, so that a rerun resumes; no encoder is written yet,
        # so every later stage must stop here rather than find no checkpoint.
        raise SeptError(
            f"bootstrap interrupted at step {summary.get('steps')}; rerun the same command to resume from {work_dir}"
        )
    written = load_encoder(out_path, device="cpu")  # the trainer's encoder and provenance
    backbone, provenance = written.model, dict(written.extra)
    if keeper is not None:
        keeper.write_log(os.path.join(work_dir, RETRIEVAL_LOG_FILENAME))
        kept_step, kept_score, kept_state = keeper.kept()
        log.info(
            "bootstrap keeps the weights of step %d (target kNN precision %.4f; best %.4f, last %.4f)",
            kept_step,
            kept_score,
            max(v for _, v in keeper.scores),
            keeper.scores[-1][1],
        )
        backbone.load_state_dict(kept_state)
        provenance.update(
            steps=kept_step,
            trained_steps=summary.get("steps", cfg.steps),
            retrieval_scores=[[s, round(v, 6)] for s, v in keeper.scores],
        )
    center = None
    if center_features:
        bundle = EncoderBundle(
            model=backbone,
            arch=cfg.arch,
            image_size=cfg.image_size,
            mean=written.mean,
            std=written.std,
            dim=written.dim,
            identity="",
            device=torch.device("cpu"),
        )
        center = feature_center(bundle, items)
        provenance["center_of"] = len(items)
    if keeper is not None or center is not None:
        write_encoder(out_path, backbone, cfg, provenance, center=center)
    for leftover in (subset, os.path.join(work_dir, CHECKPOINT_FILENAME)):
        if os.path.exists(leftover):
            os.unlink(leftover)
    return out_path
