"""Momentum (EMA) targets: the update rule and BYOL's cosine schedule; pure math, no ranks.

Every rank applies the same update to identical weights, so targets stay in sync without
communication.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters take no gradient (an EMA target)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online; buffers (BN statistics) copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def cosine_momentum(base: float, step_fraction: float) -> float:
    """BYOL's schedule: ``base`` at the start of training rising to 1 at the end."""
    fraction = min(max(step_fraction, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * fraction) + 1.0) / 2.0
