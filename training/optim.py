"""The optimizer of a pre-training run and the learning rate it steps with.

``make_optimizer`` builds SGD, AdamW or LARS with weight decay on the weights only. The learning
rate of a step is a pure function of the step (``AccelerationPlan.lr``, schedules in
``sept.training.schedule``), so a resumed run continues it exactly; ``apply_learning_rate`` sets
it on every parameter group before the step.
"""

from __future__ import annotations

import torch
from torch import nn

from sept.errors import SeptError
from sept.training.acceleration import AccelerationPlan
from sept.training.config import PretrainConfig
from sept.training.lars import LARS


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), AdamW or LARS; biases and normalisation weights get no weight decay
    (and no LARS trust ratio)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "lars":
        groups[1]["lars"] = False
        return LARS(groups, lr=cfg.lr, momentum=0.9)
    raise SeptError(f"unknown optimizer {cfg.optimizer!r} (choose from sgd, adamw, lars)")


def apply_learning_rate(optimizer: torch.optim.Optimizer, plan: AccelerationPlan, step: int) -> float:
    """Sets the plan's learning rate of ``step`` (0-based: the step about to be taken) on every
    parameter group; returns it."""
    lr = plan.lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
