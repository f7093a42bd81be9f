"""SimCLR (Chen et al. 2020): a projection MLP and the NT-Xent loss over both views of a batch.

The loss compares this rank's queries with keys from every rank: ``nt_xent_loss`` takes the
gathered keys and where this rank's rows sit among them, and knows nothing of ranks itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sept.training.distributed import all_gather_with_grad, get_rank
from sept.training.heads import mlp_head


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    first_row: int,
    temperature: float,
) -> torch.Tensor:
    """Normalised-temperature cross entropy for queries ``z1``/``z2`` (B, D), the two views of the
    same B images, against keys ``keys1``/``keys2`` (N, D) that contain those rows at
    ``first_row .. first_row + B``. Each query's positive is its other view; every other key of
    either view is a negative, the query itself excluded. Mean over the 2B queries.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    keys = F.normalize(torch.cat([keys1, keys2]), dim=1)
    n, b = keys1.shape[0], z1.shape[0]
    logits = torch.cat([z1, z2]) @ keys.T / temperature  # (2B, 2N)
    rows = torch.arange(b, device=z1.device) + first_row
    self_index = torch.cat([rows, rows + n])
    positive_index = torch.cat([rows + n, rows])
    query = torch.arange(2 * b, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[query, self_index] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive_index)


class SimCLR(nn.Module):
    """Backbone + projector; ``forward(x1, x2)`` returns the NT-Xent loss with negatives from
    every rank's batch."""

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        temperature: float,
        hidden_dim: int = 2048,
        proj_dim: int = 128,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feat_dim, hidden_dim, proj_dim, batch_norm=True)
        self.temperature = float(temperature)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        # One backbone pass over both views keeps BatchNorm statistics over the whole batch.
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).float().chunk(2)
        keys1, keys2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
        first_row = get_rank() * z1.shape[0] if keys1.shape[0] != z1.shape[0] else 0
        return nt_xent_loss(z1, z2, keys1, keys2, first_row, self.temperature)

    def momentum_update(self, step_fraction: float) -> None:
        """SimCLR has no momentum target."""
