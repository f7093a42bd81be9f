"""open_clip checkpoints: the visual tower (ViT, ModifiedResNet or a timm trunk) and its preprocessing.

Two ways in, both ending in the visual tower's weights and open_clip's ``model_cfg``:

- a hub folder (what ``hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K`` leaves, or
  open_clip's ``push_to_hf_hub``): ``open_clip_config.json`` holds ``model_cfg`` and
  ``preprocess_cfg``, beside ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``;
- a checkpoint file (a training run's ``epoch_N.pt``, a released ``.bin``) with
  ``--arch open_clip/NAME``, NAME being one of open_clip's built-in model configs.

The tower is built by ``open_clip.model._build_vision_tower``, the function ``open_clip.CLIP``
itself builds its tower with: building the whole CLIP model would also build the text tower,
which for some models fetches a Hugging Face text model. ``--pool`` sets the ViT's own
``pool_type`` (``tok`` for cls, ``avg`` for mean; the projection applies to either) or, for a
ModifiedResNet, replaces its attention pool by a mean over positions (``mean``, features before
the projection). The preprocessing is open_clip's ``image_transform`` for evaluation: shorter
side resized to the model's size, bicubic by default, centre crop, CLIP's mean and std unless the
checkpoint's ``preprocess_cfg`` says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from sept.errors import SeptError, first_line
from sept.training.encoder.pooling import no_class_token
from sept.training.encoder.preprocess import Preprocessing

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
# The names open_clip writes a hub folder's weights under, in the order open_clip prefers them.
WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
VISUAL_PREFIX = "visual."
_VIT_POOL_TYPE = {"cls": "tok", "mean": "avg"}


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise SeptError("open_clip checkpoints need open_clip: pip install 'sept[open_clip]'") from None
    return open_clip


def is_open_clip_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def read_folder(path: str) -> tuple[dict, dict, str]:
    """(model_cfg, preprocess_cfg, weights file) of an open_clip hub folder."""
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise SeptError(f"cannot read {config_path}: {first_line(err)}") from None
    if not isinstance(config, Mapping) or not isinstance(config.get("model_cfg"), Mapping):
        raise SeptError(f"{config_path} has no model_cfg")
    weights = next((os.path.join(path, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise SeptError(f"open_clip folder {path} holds none of {', '.join(WEIGHT_NAMES)}")
    return dict(config["model_cfg"]), dict(config.get("preprocess_cfg") or {}), weights


def builtin_config(name: str) -> dict:
    """open_clip's own ``model_cfg`` for a built-in model name (``ViT-B-32``, ``RN50``...)."""
    model_cfg = _open_clip().get_model_config(name)
    if model_cfg is None:
        raise SeptError(f"unknown open_clip model {name!r} (open_clip.list_models() names them)")
    return model_cfg


def _tower_kind(vision_cfg: Mapping) -> str:
    if vision_cfg.get("timm_model_name"):
        return "timm"
    return "resnet" if isinstance(vision_cfg.get("layers"), (list, tuple)) else "vit"


def build_visual(model_cfg: Mapping, pool: str) -> tuple[nn.Module, int]:
    """open_clip's visual tower for ``model_cfg``, randomly initialised, pooled as ``pool`` says,
    and its features' dimension."""
    _open_clip()
    from open_clip.model import _build_vision_tower

    vision_cfg = dict(model_cfg["vision_cfg"])
    kind = _tower_kind(vision_cfg)
    if kind == "timm":
        vision_cfg["timm_model_pretrained"] = False  # never fetch the trunk's own weights
        if pool != "default":
            raise SeptError(
                f"--pool {pool} applies to open_clip's ViT and ModifiedResNet towers, not its timm tower "
                f"{vision_cfg['timm_model_name']}; use --pool default"
            )
    if pool == "cls" and kind == "resnet":
        raise no_class_token("open_clip's ModifiedResNet")
    if pool != "default" and kind == "vit":
        if vision_cfg.get("attentional_pool"):
            raise SeptError(f"--pool {pool}: this open_clip ViT pools by attention; use --pool default")
        vision_cfg["pool_type"] = _VIT_POOL_TYPE[pool]
    try:
        visual = _build_vision_tower(
            int(model_cfg["embed_dim"]), vision_cfg, quick_gelu=bool(model_cfg.get("quick_gelu", False))
        )
    except (TypeError, KeyError, ValueError, AssertionError) as err:
        raise SeptError(f"open_clip cannot build this model_cfg's visual tower: {first_line(err)}") from None
    if kind == "resnet" and pool == "mean":
        width = int(visual.attnpool.positional_embedding.shape[1])  # layer4's channels
        visual.attnpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return visual, width
    if kind == "timm":
        with torch.no_grad():  # a timm trunk's output width depends on its head; ask the tower
            return visual, int(visual.eval()(torch.zeros(1, 3, *_size_pair(visual.image_size))).shape[-1])
    return visual, int(visual.output_dim)


def _size_pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _rgb(value) -> tuple[float, float, float]:
    # open_clip takes one value for all three channels as image_transform does
    values = tuple(float(x) for x in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    if len(values) != 3:
        raise SeptError(f"open_clip preprocess_cfg mean/std must have 3 values, got {value!r}")
    return values


def visual_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The visual tower's weights of a whole CLIP state dict (keys ``visual.*``, prefix removed),
    and the other keys (the text tower), left out; a dict without ``visual.*`` keys is taken as
    the tower's own."""
    if not any(k.startswith(VISUAL_PREFIX) for k in state_dict):
        return dict(state_dict), []
    visual = {k[len(VISUAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(VISUAL_PREFIX)}
    return visual, sorted(k for k in state_dict if not k.startswith(VISUAL_PREFIX))


def preprocessing(visual: nn.Module, preprocess_cfg: Mapping, *, source: str) -> Preprocessing:
    """open_clip's evaluation transform for ``visual`` (``open_clip.image_transform``'s defaults
    overlaid by the checkpoint's ``preprocess_cfg``; the size is the tower's own, as
    ``open_clip.create_model`` sets it)."""
    _open_clip()
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), dict(preprocess_cfg))
    height, width = _size_pair(getattr(visual, "image_size", None) or cfg["size"])
    if height != width:
        raise SeptError(f"open_clip model takes {height}x{width} images; sept crops square images")
    notes = [source]
    if cfg.get("resize_mode", "shortest") != "shortest":
        # 'squash' and 'longest' change the aspect ratio or pad; sept keeps to one eval transform.
        notes.append(f"resize_mode {cfg['resize_mode']} read as shortest")
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"  # 'random' is bicubic at eval
    return Preprocessing(
        image_size=height,
        mean=_rgb(cfg["mean"]),
        std=_rgb(cfg["std"]),
        interpolation=interpolation,
        source="; ".join(notes),
    )
