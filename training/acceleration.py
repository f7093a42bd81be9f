"""The acceleration strategies of Kocyigit, Hospedales & Bilen, "Accelerating Self-Supervised
Learning via Efficient Training Strategies" (WACV 2023, arXiv 2212.05611), as one per-step plan.

Each strategy is a config flag; the ``fast`` preset (``sept.training.config.PRESETS``) turns all
three on. ``AccelerationPlan`` turns a config into pure functions of the optimizer step, so the
trainer, every data-loading worker and a resumed job all agree on a step's settings without
talking to each other. Nothing here knows about ranks, workers or files.

1. Extendable cyclic learning rate (``lr_schedule: cyclic``). Training is a sequence of cycles of
   ``cycle_steps`` steps; each cycle warms up linearly (``warmup_steps``), then decays along a
   half cosine to ``min_lr_ratio`` of its peak, and cycle ``c`` peaks at
   ``lr * cycle_decay**c`` (``sept.training.schedule.cyclic_learning_rate``). The learning rate
   of a step never depends on the total step count, so a finished run can be extended by more
   cycles (raise ``steps``) and resumes with exactly the learning rates it would have had, and
   every cycle's end is a low-learning-rate point at which the encoder is usable.
2. Progressive augmentation magnitude and image resolution (``progressive: true``). Each cycle
   (the whole run under the cosine schedule) is cut into ``progressive_stages`` equal stages.
   In stage ``k`` of ``K`` images are cropped to a side rising linearly from
   ``min_image_size`` to ``image_size`` and the augmentation magnitude rises from
   ``min_strength`` to 1: colour-jitter strength and grayscale probability scale with it, and
   the random-resized-crop minimum scale is ``1 - (1 - min_scale) * magnitude``, so early
   stages see small, mildly augmented images while the learning rate is high, and the last
   stage of every cycle trains at full resolution and full augmentation as the learning rate
   anneals. The backbone is fully convolutional with global pooling, so it takes every size.
3. Hard positive mining by augmentation difficulty (``hard_positives: true``). For every image
   the loader draws ``positive_candidates`` pairs of crop boxes (parameters only, no pixels) and
   keeps the pair whose two crops overlap least (lowest intersection over union in the original
   image, ``hardest_pair``): the positive pair the method has to work hardest to match. The
   other augmentations (flip, colour) are drawn as usual for the kept pair.

Where this departs from the paper. This module was written from the paper's description of the
three strategies, not from its code, and these choices are sept's:

* the cycle shape (linear warm-up + half-cosine decay, optional per-cycle decay of the peak) and
  the default of three cycles per run (``cycle_steps`` = a third of ``steps`` unless given);
* progressive resizing and magnitude use a small number of discrete stages per cycle (so a
  handful of image sizes occur and per-size kernels/compilation stay cached), restart with every
  cycle, and tie resolution and magnitude to the same stage index;
* augmentation difficulty is measured from the sampled augmentation parameters alone
  (``1 - IoU`` of the two crop boxes), at no model cost, rather than by the loss of the current
  model on candidate views; flips and colour changes do not count towards difficulty;
* the schedules are defined per optimizer step, not per epoch, so they behave the same whatever
  the data size and survive mid-epoch preemption.

Where it helps and where it does not (``benchmarks/RESULTS.md``, "Time to accuracy"): on the
demo corpus on a CPU, where pre-training learns the target (16 px, 3000 steps of a small
ResNet), the preset never reaches plain SimCLR's final kNN accuracy, and neither does any
strategy alone; progressive resolution cuts the time per step, at lower accuracy. The paper's
2.7x was measured on long ImageNet-scale GPU runs, which this project has not been able to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sept.training.schedule import (
    cyclic_learning_rate,
    learning_rate,
    progressive_image_size,
    progressive_stage,
    progressive_strength,
)


@dataclass(frozen=True)
class AccelerationPlan:
    """The per-step learning rate, image size and augmentation magnitude of a run, and how many
    candidate positive pairs the loader mines from; built once from the config
    (``from_config``), picklable, so data-loading workers hold their own copy."""

    steps: int
    base_lr: float
    warmup_steps: int
    image_size: int
    lr_schedule: str = "cosine"
    cycle_steps: int = 0
    cycle_decay: float = 1.0
    min_lr_ratio: float = 0.0
    progressive: bool = False
    min_image_size: int = 0
    min_strength: float = 1.0
    stages: int = 1
    positive_candidates: int = 1

    @classmethod
    def from_config(cls, cfg) -> AccelerationPlan:
        """The plan of a ``PretrainConfig`` (duck-typed: any object with its fields)."""
        return cls(
            steps=cfg.steps,
            base_lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            image_size=cfg.image_size,
            lr_schedule=cfg.lr_schedule,
            cycle_steps=cfg.cycle_steps or cfg.steps,
            cycle_decay=cfg.cycle_decay,
            min_lr_ratio=cfg.min_lr_ratio,
            progressive=cfg.progressive,
            min_image_size=cfg.min_image_size or cfg.image_size,
            min_strength=cfg.min_strength if cfg.progressive else 1.0,
            stages=cfg.progressive_stages if cfg.progressive else 1,
            positive_candidates=cfg.positive_candidates if cfg.hard_positives else 1,
        )

    @property
    def period(self) -> int:
        """Steps over which the progressive schedules rise once: a cycle, or the whole run."""
        return self.cycle_steps if self.lr_schedule == "cyclic" else self.steps

    def lr(self, step: int) -> float:
        """Learning rate of 0-based optimizer step ``step``."""
        if self.lr_schedule == "cyclic":
            return cyclic_learning_rate(
                step,
                cycle_steps=self.cycle_steps,
                base_lr=self.base_lr,
                warmup_steps=self.warmup_steps,
                cycle_decay=self.cycle_decay,
                min_lr_ratio=self.min_lr_ratio,
            )
        return learning_rate(step, total_steps=self.steps, base_lr=self.base_lr, warmup_steps=self.warmup_steps)

    def stage(self, step: int) -> int:
        return progressive_stage(step, period=self.period, stages=self.stages) if self.progressive else 0

    def image_size_at(self, step: int) -> int:
        """Side of the training crops at ``step``."""
        if not self.progressive:
            return self.image_size
        return progressive_image_size(
            step, period=self.period, stages=self.stages, min_size=self.min_image_size, max_size=self.image_size
        )

    def strength_at(self, step: int) -> float:
        """Augmentation magnitude at ``step`` (1 = the configured augmentations)."""
        if not self.progressive:
            return 1.0
        return progressive_strength(step, period=self.period, stages=self.stages, min_strength=self.min_strength)

    def cycle_ends(self) -> list[int]:
        """The step counts at which a cycle of the cyclic schedule ends (within ``steps``);
        ``[steps]`` under the cosine schedule."""
        if self.lr_schedule != "cyclic":
            return [self.steps]
        ends = list(range(self.cycle_steps, self.steps + 1, self.cycle_steps))
        return ends if ends and ends[-1] == self.steps else ends + [self.steps]


def box_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of (top, left, height, width) boxes ``a`` and ``b`` [..., 4]."""
    a, b = np.asarray(a), np.asarray(b)
    top, left = np.maximum(a[..., 0], b[..., 0]), np.maximum(a[..., 1], b[..., 1])
    bottom = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
    right = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def crop_difficulty(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How hard positive pairs of crops are: 1 - IoU (1 for disjoint crops, 0 for the same crop)."""
    return 1.0 - box_ious(a, b)


def hardest_pairs(pairs: np.ndarray) -> np.ndarray:
    """int64 [N]: per row of candidate crop pairs ``pairs`` [N, C, 2, 4], the index of the most
    difficult pair (the first of equals)."""
    pairs = np.asarray(pairs)
    if pairs.shape[1] == 0:
        raise ValueError("no candidate pairs")
    return crop_difficulty(pairs[:, :, 0], pairs[:, :, 1]).argmax(1)
