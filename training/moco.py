"""MoCo v2 (Chen et al. 2020): a momentum key encoder and a queue of past keys as negatives.

Keys from every rank enter the queue, so all ranks hold the same queue. The original shuffles
BatchNorm across GPUs to stop the key encoder leaking batch statistics; this version does not
(it must also run on one GPU or CPU), which the symmetric loss makes tolerable at these scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sept.training.distributed import all_gather_no_grad
from sept.training.heads import mlp_head
from sept.training.momentum import ema_update, frozen_copy


def moco_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: each query (B, D) against its key (B, D) and the queued negatives (K, D)."""
    query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    positive = (query * key).sum(dim=1, keepdim=True)
    negatives = query @ queue.T
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


class MoCo(nn.Module):
    """Query encoder (backbone + projector), its momentum copy, and the key queue."""

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        temperature: float,
        momentum: float,
        queue_size: int = 4096,
        hidden_dim: int = 2048,
        proj_dim: int = 128,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feat_dim, hidden_dim, proj_dim, batch_norm=False)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)).float(), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[0]
        keys = all_gather_no_grad(keys)[-size:]  # a batch larger than the queue keeps its newest keys
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[slots] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        q1, q2 = self.projector(self.backbone(torch.cat([x1, x2]))).float().chunk(2)
        k1, k2 = self._keys(torch.cat([x1, x2])).chunk(2)
        queue = self.queue.clone().detach()
        loss = (moco_loss(q1, k2, queue, self.temperature) + moco_loss(q2, k1, queue, self.temperature)) / 2
        self._enqueue(torch.cat([k1, k2]))
        return loss

    def momentum_update(self, step_fraction: float) -> None:
        """Key encoder <- EMA of the query encoder at the constant MoCo momentum."""
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)
