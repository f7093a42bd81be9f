"""DINOv2's released checkpoints (``dinov2_vits14_pretrain.pth``, ``..._reg4_pretrain.pth``) onto
timm's ``vit_*_patch14_dinov2`` and ``vit_*_patch14_reg4_dinov2``.

The official files name their weights as facebookresearch/dinov2 does (``cls_token``,
``pos_embed`` holding the class token's position, ``register_tokens``, ``mask_token``,
``blocks.N.ls1.gamma``, SwiGLU ``mlp.w12``/``mlp.w3`` for ViT-g). timm's own converter,
``timm.models.vision_transformer.checkpoint_filter_fn``, is what timm runs on these very files
when it loads DINOv2 weights itself: it folds the class token's position into the class token
for the register models, renames registers and SwiGLU layers, drops ``mask_token`` (used only
in training) and resamples the position embedding when the model was built for another size.

``timm_arch`` names the timm model a release fits when no ``--arch`` is given (``--format
dinov2``): its size from the embedding width, registers from ``register_tokens``, and, where they
differ from the timm model's, its depth, patch size and image size (the position grid's, or the
caller's ``--image-size``, onto which timm's filter resamples the position embedding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from sept.errors import SeptError
from sept.training.encoder.archs import TIMM_PREFIX

# The released sizes: embedding width -> timm's size name and depth (heads are 64 wide in all).
_SIZES = {384: ("small", 12), 768: ("base", 12), 1024: ("large", 24), 1536: ("giant", 40)}
_PATCH = 14
_GRID = 37  # the released files' position grid: 518 px at patch 14


def is_dinov2_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    # timm's filter recognises the official files by their mask token, and so does this.
    return "mask_token" in state_dict and "patch_embed.proj.weight" in state_dict


def to_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module, *, arch: str) -> dict[str, torch.Tensor]:
    """The official DINOv2 ``state_dict`` in the key names and shapes of timm ``model``."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        raise SeptError(
            f"a DINOv2 checkpoint goes onto timm's DINOv2 ViTs (timm/vit_small_patch14_dinov2, "
            f"timm/vit_small_patch14_reg4_dinov2, ...), not {arch}"
        )
    # The filter resamples a position embedding that does not fit, so a register checkpoint on a
    # model without registers would load without a word, wrongly: the count is checked first.
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    if registers != getattr(model, "num_reg_tokens", 0):
        raise SeptError(
            f"the DINOv2 checkpoint has {registers} register tokens but {arch} has "
            f"{getattr(model, 'num_reg_tokens', 0)}; use the {'_reg4' if registers else 'plain'} timm DINOv2 model"
        )
    return checkpoint_filter_fn(dict(state_dict), model)  # a copy: the filter pops keys of its input


def timm_arch(state_dict: Mapping[str, torch.Tensor], *, image_size: int | None = None) -> tuple[str, dict]:
    """The timm arch (``timm/vit_small_patch14_dinov2``...) and ``create_model`` keyword arguments
    for an official DINOv2 ``state_dict`` (module docstring); raises ``SeptError`` for a width
    DINOv2 was not released at."""
    patch = state_dict["patch_embed.proj.weight"]
    width = int(patch.shape[0])
    if width not in _SIZES:
        raise SeptError(
            f"a DINOv2 checkpoint {width} wide is none of the released sizes ({', '.join(map(str, _SIZES))}); "
            "pass --arch timm/vit_..._dinov2 with --arch-kwargs for its shape"
        )
    size, depth = _SIZES[width]
    registers = int(state_dict["register_tokens"].shape[1]) if "register_tokens" in state_dict else 0
    if registers not in (0, 4):
        raise SeptError(f"a DINOv2 checkpoint with {registers} register tokens fits no timm DINOv2 model (0 or 4)")
    name = f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2"
    kwargs: dict = {}
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
    if blocks and len(blocks) != depth:
        kwargs["depth"] = len(blocks)
    if int(patch.shape[-1]) != _PATCH:
        kwargs["patch_size"] = int(patch.shape[-1])
    grid = math.isqrt(int(state_dict["pos_embed"].shape[1]) - 1)  # the class token's position first
    size_px = int(image_size) if image_size else grid * int(patch.shape[-1])
    if size_px != _GRID * _PATCH:
        kwargs["img_size"] = size_px
    return f"{TIMM_PREFIX}{name}", kwargs
