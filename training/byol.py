"""BYOL (Grill et al. 2020): an online network with a predictor regresses a momentum target's
projection of the other view; no negatives, so no communication beyond DDP's gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sept.training.heads import mlp_head
from sept.training.momentum import cosine_momentum, ema_update, frozen_copy


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(prediction, target), averaged over the batch; target carries no gradient."""
    prediction = F.normalize(prediction, dim=1)
    target = F.normalize(target.detach(), dim=1)
    return (2 - 2 * (prediction * target).sum(dim=1)).mean()


class BYOL(nn.Module):
    """Online backbone + projector + predictor; target backbone + projector by EMA."""

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        momentum: float,
        hidden_dim: int = 4096,
        proj_dim: int = 256,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feat_dim, hidden_dim, proj_dim, batch_norm=True)
        self.predictor = mlp_head(proj_dim, hidden_dim, proj_dim, batch_norm=True)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.base_momentum = float(momentum)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x1, x2])
        p1, p2 = self.predictor(self.projector(self.backbone(both))).float().chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_backbone(both)).float().chunk(2)
        return (byol_loss(p1, t2) + byol_loss(p2, t1)) / 2

    def momentum_update(self, step_fraction: float) -> None:
        """Target <- EMA of the online network, momentum rising from its base to 1 (cosine)."""
        momentum = cosine_momentum(self.base_momentum, step_fraction)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
