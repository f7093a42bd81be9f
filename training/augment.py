"""SimCLR-style view augmentations that hold up on small (16-64 px) images, with torchvision v2.

The image is turned into a uint8 tensor first, so cropping runs on tensors; the colour change
and normalisation can wait for the whole batch (``RawView``, ``ViewAugment.finish``,
``sept.training.colour``), which is one pass instead of a chain of small ops per view.
Gaussian blur is left out: at 32 px it erases the image (SimCLR's CIFAR recipe drops it too).

Views can be made at a smaller ``size`` and a weaker ``strength`` (progressive resizing and
magnitude), from the hardest of several candidate crop pairs (hard positive mining), and with a
segmentation mask cropped and flipped exactly like its image (DetCon); see
``sept.training.acceleration`` for the schedules that choose these per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from sept.training.acceleration import Box, hardest_pair
from sept.training.colour import apply_colour, draw_colour
from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD

_RATIO = (3 / 4, 4 / 3)


class RawView(NamedTuple):
    """A view cropped and flipped, its colour change drawn but not yet applied."""

    pixels: torch.Tensor
    """uint8 [3, size, size]"""
    colour: torch.Tensor
    """[colour.NUM_PARAMS] (``sept.training.colour.draw_colour``)"""


@dataclass
class ViewAugment:
    """Random resized crop, horizontal flip, colour jitter (``color_jitter`` = SimCLR strength s:
    brightness/contrast/saturation 0.8s, hue 0.2s, applied with p=0.8) and grayscale (p=0.2),
    then normalisation with ``mean``/``std``; each call draws from torch's global RNG.

    ``strength`` m in (0, 1] scales the jitter strength and grayscale probability by m and
    raises the crop's minimum scale to ``1 - (1 - min_scale) * m``."""

    image_size: int
    color_jitter: float = 0.5
    min_scale: float = 0.2
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def crop_box(self, image: torch.Tensor, strength: float = 1.0) -> Box:
        """A random-resized-crop box (top, left, height, width) of ``image`` [C, H, W]."""
        low = 1.0 - (1.0 - self.min_scale) * strength
        return tuple(int(v) for v in RandomResizedCrop.get_params(image, [low, 1.0], list(_RATIO)))

    def crop_pair(self, image: torch.Tensor, strength: float = 1.0, candidates: int = 1) -> tuple[Box, Box]:
        """Two crop boxes: the least-overlapping of ``candidates`` random pairs (one pair: plain)."""
        pairs = [(self.crop_box(image, strength), self.crop_box(image, strength)) for _ in range(max(1, candidates))]
        return pairs[hardest_pair(pairs)] if len(pairs) > 1 else pairs[0]

    def raw_view(
        self,
        image: torch.Tensor,
        box: Box,
        *,
        size: int | None = None,
        strength: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> tuple[RawView, torch.Tensor | None]:
        """(the view before its colour change, its uint8 [size, size] mask or None) of the uint8
        ``image`` [3, H, W] (and ``mask`` [H, W]) cropped to ``box``: the mask gets the same
        crop (nearest neighbour) and flip, no colour change. ``finish`` completes views."""
        size = int(size or self.image_size)
        top, left, height, width = box
        pixels = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            pixels = TF.horizontal_flip(pixels)
        out_mask = None
        if mask is not None:
            out_mask = TF.resized_crop(
                mask[None], top, left, height, width, [size, size], interpolation=InterpolationMode.NEAREST
            )[0]
            if flip:
                out_mask = out_mask.flip(-1)
        return RawView(pixels, draw_colour(self.color_jitter, strength)), out_mask

    def finish(self, pixels: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        """Float32 views [N, 3, S, S]: the stacked uint8 ``pixels`` after their ``colour``
        parameters (``RawView``), normalised with ``mean``/``std``: one pass for a whole batch."""
        return TF.normalize(apply_colour(pixels, colour), list(self.mean), list(self.std))

    def finish_one(self, raw: RawView) -> torch.Tensor:
        """``finish`` for a single view: float32 [3, size, size]."""
        return self.finish(raw.pixels[None], raw.colour[None])[0]

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """One augmented view: float32 [3, image_size, image_size]."""
        image = _as_uint8(img)
        return self.finish_one(self.raw_view(image, self.crop_box(image))[0])

    def two_views(
        self,
        img: Image.Image | torch.Tensor,
        *,
        size: int | None = None,
        strength: float = 1.0,
        candidates: int = 1,
        finish: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[RawView, RawView]:
        """Two views of ``img`` (from the hardest of ``candidates`` crop pairs); with ``finish``
        False, as ``RawView``s for a batched ``finish``."""
        image = _as_uint8(img)
        box1, box2 = self.crop_pair(image, strength, candidates)
        raw1 = self.raw_view(image, box1, size=size, strength=strength)[0]
        raw2 = self.raw_view(image, box2, size=size, strength=strength)[0]
        return (self.finish_one(raw1), self.finish_one(raw2)) if finish else (raw1, raw2)

    def two_views_with_masks(
        self,
        img: Image.Image | torch.Tensor,
        mask: torch.Tensor,
        *,
        size: int | None = None,
        strength: float = 1.0,
        candidates: int = 1,
        finish: bool = True,
    ) -> tuple[torch.Tensor | RawView, torch.Tensor | RawView, torch.Tensor, torch.Tensor]:
        """(view1, view2, mask1, mask2): two views and the label map ``mask`` [H, W] (uint8, one
        label per segment, same size as the image) cropped and flipped with each; with ``finish``
        False, the views as ``RawView``s for a batched ``finish``."""
        image = _as_uint8(img)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape[-2:])}")
        box1, box2 = self.crop_pair(image, strength, candidates)
        raw1, mask1 = self.raw_view(image, box1, size=size, strength=strength, mask=mask)
        raw2, mask2 = self.raw_view(image, box2, size=size, strength=strength, mask=mask)
        if finish:
            return self.finish_one(raw1), self.finish_one(raw2), mask1, mask2
        return raw1, raw2, mask1, mask2


def _as_uint8(img: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(img, Image.Image):
        return TF.pil_to_tensor(img.convert("RGB"))
    return img


def two_views(img: Image.Image, image_size: int = 32, color_jitter: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two SimCLR views of ``img`` at ``image_size`` (builds a ``ViewAugment`` per call; hold one
    ``ViewAugment`` in loops)."""
    return ViewAugment(image_size, color_jitter).two_views(img)
