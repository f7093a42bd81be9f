"""The SSL method registry: a method name and its hyperparameters -> the training module.

Every method module has ``momentum_update(step_fraction)`` and ``forward(*inputs) -> loss``;
the inputs are ``(view1, view2)``, plus ``(mask1, mask2, mask_ids)`` for the methods listed in
``MASK_METHODS`` (DetCon), whose data must carry segmentation masks (``sept.data.masks``).
"""

from __future__ import annotations

from torch import nn

from sept.errors import SeptError

METHODS = ("simclr", "moco", "byol", "detcon_s", "detcon_b")
MASK_METHODS = ("detcon_s", "detcon_b")


def check_method(name: str) -> None:
    """Raises ``SeptError`` unless ``name`` is a method ``build_method`` can build."""
    if name not in METHODS:
        raise SeptError(f"unknown SSL method {name!r} (choose from {', '.join(METHODS)})")


def needs_masks(name: str) -> bool:
    """Whether method ``name`` trains on segmentation masks."""
    return name in MASK_METHODS


def build_method(
    name: str,
    backbone: nn.Module,
    feat_dim: int,
    *,
    temperature: float,
    momentum: float,
    detcon_temperature: float = 0.1,
) -> nn.Module:
    """The module for SSL method ``name`` around ``backbone``. Raises ``SeptError`` for an
    unknown method."""
    check_method(name)
    if name == "simclr":
        from sept.training.simclr import SimCLR

        return SimCLR(backbone, feat_dim, temperature=temperature)
    if name == "moco":
        from sept.training.moco import MoCo

        return MoCo(backbone, feat_dim, temperature=temperature, momentum=momentum)
    if name == "byol":
        from sept.training.byol import BYOL

        return BYOL(backbone, feat_dim, momentum=momentum)
    if name == "detcon_s":
        from sept.training.detcon import DetConS

        return DetConS(backbone, feat_dim, temperature=detcon_temperature)
    if name == "detcon_b":
        from sept.training.detcon import DetConB

        return DetConB(backbone, feat_dim, temperature=detcon_temperature, momentum=momentum)
    raise AssertionError(f"method {name} is registered but not built")
