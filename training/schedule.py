"""Step -> hyperparameter schedules of pre-training; pure math, no ranks, no data.

* ``learning_rate``: linear warm-up, then cosine decay to zero over the whole run (the plain
  schedule; it depends on the total step count, so extending a run changes its past).
* ``cyclic_learning_rate``: the extendable cyclic schedule of arXiv 2212.05611 (see
  ``sept.training.acceleration`` for how and why); it never looks at the total step count.
* ``global_batch_lr``: the linear scaling rule, a peak rate given for one global batch moved to another.
* ``progressive_stage``: where a step sits in its cycle, as one of ``stages`` equal stages;
  the progressive image-resolution and augmentation-magnitude schedules are functions of it.
"""

from __future__ import annotations

import math


def global_batch_lr(lr: float, global_batch: int, reference_batch: int | None) -> float:
    """``lr`` given for ``reference_batch`` samples per step, at ``global_batch`` (Goyal et al. 2017:
    the rate grows with the batch, so adding ranks keeps the per-sample step); as given when None."""
    if reference_batch is None:
        return lr
    return lr * global_batch / reference_batch


def learning_rate(step: int, *, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def cyclic_learning_rate(
    step: int,
    *,
    cycle_steps: int,
    base_lr: float,
    warmup_steps: int = 0,
    cycle_decay: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate at 0-based ``step`` of a run made of cycles of ``cycle_steps`` steps.

    Cycle ``c`` peaks at ``base_lr * cycle_decay**c``: it rises linearly over its first
    ``min(warmup_steps, cycle_steps // 2)`` steps, then falls along a half cosine to
    ``min_lr_ratio`` times its peak at its last step. Every cycle ends at a low learning rate,
    so a run can stop at any cycle's end with a usable model, or be extended by more cycles
    without changing the learning rate of any step already taken.
    """
    if cycle_steps < 1:
        raise ValueError(f"cycle_steps must be at least 1, got {cycle_steps}")
    cycle, t = divmod(int(step), int(cycle_steps))
    peak = base_lr * cycle_decay**cycle
    warmup = min(int(warmup_steps), cycle_steps // 2)
    if warmup > 0 and t < warmup:
        return peak * (t + 1) / warmup
    decay_steps = max(1, cycle_steps - warmup - 1)
    progress = min(1.0, (t - warmup) / decay_steps)
    low = peak * min_lr_ratio
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def progressive_stage(step: int, *, period: int, stages: int) -> int:
    """The stage of 0-based ``step`` within its period of ``period`` steps: the period is cut into
    ``min(stages, period)`` equal parts, numbered from 0, so every period ends in its last stage."""
    if period < 1 or stages < 1:
        raise ValueError(f"period and stages must be at least 1, got {period} and {stages}")
    parts = min(stages, period)
    t = int(step) % int(period)
    return min(parts - 1, t * parts // period)


def progressive_fraction(step: int, *, period: int, stages: int) -> float:
    """How far ``step``'s stage is through its period: 0 in the first stage, 1 in the last."""
    parts = min(stages, period)
    return 1.0 if parts <= 1 else progressive_stage(step, period=period, stages=stages) / (parts - 1)


def progressive_image_size(
    step: int, *, period: int, stages: int, min_size: int, max_size: int, multiple: int = 4
) -> int:
    """The image side for ``step``: ``min_size`` in a period's first stage rising linearly to
    ``max_size`` in its last, rounded down to a multiple of ``multiple`` (never below it)."""
    fraction = progressive_fraction(step, period=period, stages=stages)
    if fraction >= 1.0:
        return int(max_size)
    size = min_size + (max_size - min_size) * fraction
    return max(int(multiple), int(size) // multiple * multiple)


def progressive_strength(step: int, *, period: int, stages: int, min_strength: float) -> float:
    """The augmentation magnitude (1 = the configured augmentations) for ``step``: ``min_strength``
    in a period's first stage rising linearly to 1 in its last, in step with the image size."""
    fraction = progressive_fraction(step, period=period, stages=stages)
    return float(min_strength + (1.0 - min_strength) * fraction)
