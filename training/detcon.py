"""DetCon (Hénaff et al. 2021, "Efficient Visual Pretraining with Contrastive Detection"):
contrastive learning between mask-pooled features of image segments.

Every image comes with a Felzenszwalb–Huttenlocher label map (``sept.data.masks``), cropped and
flipped together with each view (``sept.training.augment``); the loader picks up to
``num_masks`` (16) segments present in both views (``mask_ids``, -1 = none). The backbone's last
feature map is average-pooled inside each segment (``mask_pool``: the label map is reduced to the
feature grid by area, so a segment's weight in a cell is the fraction of the cell it covers),
projected, and trained with ``detcon_loss``: each segment of one view must pick out the same
segment of the other view among the other segments of its image and every segment of every
other image of the global batch (keys from all ranks, all-gathered), at temperature 0.1.

* DetCon-S (``DetConS``): SimCLR's architecture: one network, a projector, and gradients through
  the gathered keys.
* DetCon-B (``DetConB``): BYOL's architecture: the online network adds a predictor; keys come from
  a momentum (EMA) target network, with no gradient, as in the paper's DetCon-B.

Segments absent from a view (a crop can cut one out) take part neither as queries nor as keys.
Both views' segments are projected in one pass so BatchNorm sees the whole batch; only valid
segments enter the projector, so empty masks do not skew its statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sept.training.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from sept.training.heads import mlp_head
from sept.training.momentum import cosine_momentum, ema_update, frozen_copy


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last convolutional feature map [B, C, h, w] of a torchvision-style ResNet backbone."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))


def mask_pool(
    features: torch.Tensor, labels: torch.Tensor, mask_ids: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-pooled features [B, K, C] and their validity [B, K] (bool).

    ``features`` [B, C, h, w]; ``labels`` [B, S, S] segment labels of the view; ``mask_ids``
    [B, K] the labels to pool (-1 = none). A segment's weight in a feature cell is the fraction
    of that cell's pixels it covers; a segment with no pixel in the view is invalid.
    """
    one_hot = (labels.long()[:, None] == mask_ids[:, :, None, None]).to(features.dtype)  # [B, K, S, S]
    weights = F.adaptive_avg_pool2d(one_hot, features.shape[-2:])  # [B, K, h, w]
    area = weights.sum(dim=(-2, -1))
    pooled = torch.einsum("bkhw,bchw->bkc", weights, features) / area.clamp_min(eps)[..., None]
    valid = (mask_ids >= 0) & (area > eps)
    return pooled, valid


def detcon_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    query_valid: torch.Tensor,
    key_valid: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Cross entropy of each valid query (N, D) picking its positive key (row ``positives[i]`` of
    ``keys`` (M, D)) among all valid keys, on cosine similarity / ``temperature``; mean over
    valid queries (0 with a gradient path if none is valid)."""
    queries, keys = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
    logits = queries @ keys.T / temperature
    logits = logits.masked_fill(~key_valid[None, :], float("-inf"))
    rows = query_valid & key_valid[positives]
    if not bool(rows.any()):
        return queries.sum() * 0.0
    return F.cross_entropy(logits[rows], positives[rows])


def _project_valid(head: nn.Module, pooled: torch.Tensor, valid: torch.Tensor, out_dim: int) -> torch.Tensor:
    """``head`` applied to the valid rows of ``pooled`` (N, C); zeros elsewhere (N, out_dim)."""
    out = pooled.new_zeros(pooled.shape[0], out_dim)
    if bool(valid.any()):
        out = out.index_put((valid.nonzero(as_tuple=True)[0],), head(pooled[valid]).to(out.dtype))
    return out


class _DetConBase(nn.Module):
    def _pooled(self, backbone: nn.Module, x1, x2, m1, m2, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views' mask-pooled features (2BK, C) (view 1 first) and validity (2BK,)."""
        f1, f2 = feature_map(backbone, torch.cat([x1, x2])).float().chunk(2)
        p1, v1 = mask_pool(f1, m1, ids)
        p2, v2 = mask_pool(f2, m2, ids)
        pooled = torch.cat([p1.flatten(0, 1), p2.flatten(0, 1)])
        return pooled, torch.cat([v1.flatten(), v2.flatten()])

    def _symmetric_loss(self, q1, q2, k1, k2, v1, v2, gather) -> torch.Tensor:
        keys1, keys2 = gather(k1), gather(k2)
        valid1 = all_gather_no_grad(v1.float()) > 0.5
        valid2 = all_gather_no_grad(v2.float()) > 0.5
        first_row = get_rank() * q1.shape[0] if keys1.shape[0] != q1.shape[0] else 0
        positives = torch.arange(q1.shape[0], device=q1.device) + first_row
        return (
            detcon_loss(q1, keys2, positives, v1, valid2, self.temperature)
            + detcon_loss(q2, keys1, positives, v2, valid1, self.temperature)
        ) / 2


class DetConS(_DetConBase):
    """DetCon-S: backbone + projector; ``forward(x1, x2, mask1, mask2, mask_ids)`` -> loss."""

    needs_masks = True

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        temperature: float = 0.1,
        hidden_dim: int = 2048,
        proj_dim: int = 128,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feat_dim, hidden_dim, proj_dim, batch_norm=True)
        self.temperature = float(temperature)
        self.proj_dim = proj_dim

    def forward(self, x1, x2, mask1, mask2, mask_ids) -> torch.Tensor:
        pooled, valid = self._pooled(self.backbone, x1, x2, mask1, mask2, mask_ids)
        z1, z2 = _project_valid(self.projector, pooled, valid, self.proj_dim).float().chunk(2)
        v1, v2 = valid.chunk(2)
        return self._symmetric_loss(z1, z2, z1, z2, v1, v2, all_gather_with_grad)

    def momentum_update(self, step_fraction: float) -> None:
        """DetCon-S has no momentum target."""


class DetConB(_DetConBase):
    """DetCon-B: online backbone + projector + predictor, EMA target backbone + projector."""

    needs_masks = True

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        temperature: float = 0.1,
        momentum: float = 0.99,
        hidden_dim: int = 4096,
        proj_dim: int = 256,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(feat_dim, hidden_dim, proj_dim, batch_norm=True)
        self.predictor = mlp_head(proj_dim, hidden_dim, proj_dim, batch_norm=True)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.temperature = float(temperature)
        self.base_momentum = float(momentum)
        self.proj_dim = proj_dim

    def forward(self, x1, x2, mask1, mask2, mask_ids) -> torch.Tensor:
        pooled, valid = self._pooled(self.backbone, x1, x2, mask1, mask2, mask_ids)
        online = nn.Sequential(self.projector, self.predictor)
        q1, q2 = _project_valid(online, pooled, valid, self.proj_dim).float().chunk(2)
        with torch.no_grad():
            target_pooled, _ = self._pooled(self.target_backbone, x1, x2, mask1, mask2, mask_ids)
            t1, t2 = _project_valid(self.target_projector, target_pooled, valid, self.proj_dim).float().chunk(2)
        v1, v2 = valid.chunk(2)
        return self._symmetric_loss(q1, q2, t1, t2, v1, v2, all_gather_no_grad)

    def momentum_update(self, step_fraction: float) -> None:
        """Target <- EMA of the online network, momentum rising from its base to 1 (cosine)."""
        momentum = cosine_momentum(self.base_momentum, step_fraction)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
