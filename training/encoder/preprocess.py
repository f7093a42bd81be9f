"""How an image is fed to an encoder: the evaluation transform and the defaults it falls back to.

Embedding, selection and evaluation all preprocess through ``eval_transform``, so an image is
resized, cropped and normalised the same way at every stage that compares features.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_IMAGE_SIZE = 224  # what torchvision's ImageNet weights were trained at


def eval_transform(image_size: int, mean, std) -> v2.Compose:
    """PIL image -> float32 [3, S, S]: shorter side resized to ``image_size``, centre crop, normalised."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def default_preprocessing(arch: str, model: torch.nn.Module) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) the architecture was trained with: timm's record, else ImageNet at 224 px."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, TORCHVISION_IMAGE_SIZE, TORCHVISION_IMAGE_SIZE))[-1]
    return int(size), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
