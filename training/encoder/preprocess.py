"""How an image is fed to an encoder: the evaluation transform, the record of it, and its defaults.

Embedding, selection and evaluation all preprocess through ``eval_transform``, so an image is
resized, cropped and normalised the same way at every stage that compares features: the shorter
side resized to ``resize_size`` (``image_size`` when unset) with ``interpolation``, a centre crop
of ``image_size``, then ``(x - mean) / std``. ``Preprocessing`` is that recipe as an imported
encoder records it, with where it came from (``source``); ``timm_preprocessing`` reads it off a
timm model's ``pretrained_cfg``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from sept.errors import SeptError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_IMAGE_SIZE = 224  # what torchvision's ImageNet weights were trained at
DEFAULT_INTERPOLATION = "bilinear"  # torchvision's Resize default, what every encoder before imports used
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # the modes torchvision resizes tensors with


def eval_transform(
    image_size: int, mean, std, *, resize_size: int | None = None, interpolation: str = DEFAULT_INTERPOLATION
) -> v2.Compose:
    """PIL image -> float32 [3, S, S]: shorter side resized to ``resize_size`` (default ``image_size``)
    with ``interpolation``, centre crop of ``image_size``, normalised."""
    if interpolation not in INTERPOLATIONS:
        raise SeptError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size or image_size, interpolation=InterpolationMode(interpolation), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing an imported encoder records, and where it was read (``source``)."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None
    interpolation: str = DEFAULT_INTERPOLATION
    source: str = "ImageNet defaults"

    def overridden(
        self,
        *,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Preprocessing:
        """This recipe with the caller's values where given; a new ``image_size`` keeps the
        resize-to-crop ratio (timm's ``crop_pct``) unless ``resize_size`` is given too."""
        given = {
            name: value
            for name, value in dict(
                image_size=image_size, resize_size=resize_size, interpolation=interpolation, mean=mean, std=std
            ).items()
            if value is not None
        }
        if not given:
            return self
        changes: dict = dict(given)
        if image_size is not None and resize_size is None and self.resize_size:
            changes["resize_size"] = math.floor(image_size * self.resize_size / self.image_size)
        for name in ("mean", "std"):
            if name in changes:
                changes[name] = tuple(float(x) for x in changes[name])
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        return dataclasses.replace(self, source=f"{self.source}; {flags} given", **changes)

    def describe(self) -> str:
        mean = ",".join(f"{x:.4g}" for x in self.mean)
        std = ",".join(f"{x:.4g}" for x in self.std)
        return (
            f"resize {self.resize_size or self.image_size} {self.interpolation}, crop {self.image_size}, "
            f"mean {mean}, std {std} ({self.source})"
        )


def timm_preprocessing(model: torch.nn.Module, *, image_size: int | None = None) -> Preprocessing:
    """What timm records for the model (input size, crop_pct as the resize size, interpolation,
    mean, std) through timm's own ``resolve_data_config``; ``image_size``: the size the model was
    built for, when its ``img_size`` was set (timm keeps the pretrained record unchanged then)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = int(image_size or cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation", DEFAULT_INTERPOLATION)
    return Preprocessing(
        image_size=size,
        # timm's own rule (timm.data.transforms_factory): scale_size = floor(img_size / crop_pct)
        resize_size=math.floor(size / crop_pct),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        source="timm pretrained_cfg",
    )


def default_preprocessing(arch: str, model: torch.nn.Module) -> Preprocessing:
    """The preprocessing the architecture was trained with: timm's record, else ImageNet at 224 px."""
    if getattr(model, "pretrained_cfg", None):
        return timm_preprocessing(model)
    return Preprocessing(image_size=TORCHVISION_IMAGE_SIZE, source=f"ImageNet defaults for {arch}")
