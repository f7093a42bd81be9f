"""SimCLR-style view augmentations that hold up on small (16-64 px) images, with torchvision v2.

The image is turned into a uint8 tensor first, so cropping and colour work run on tensors; only
the final normalisation produces floats. Gaussian blur is left out: at 32 px it erases the image
(SimCLR's CIFAR recipe drops it too).

Views can be made at a smaller ``size`` and a weaker ``strength`` (progressive resizing and
magnitude), from the hardest of several candidate crop pairs (hard positive mining), and with a
segmentation mask cropped and flipped exactly like its image (DetCon); see
``sept.training.acceleration`` for the schedules that choose these per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from sept.training.acceleration import Box, hardest_pair
from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD

_RATIO = (3 / 4, 4 / 3)


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

    def __post_init__(self) -> None:
        self._jitters: dict[float, v2.Transform] = {}

    def _jitter(self, strength: float) -> v2.Transform | None:
        s = float(self.color_jitter) * strength
        if s <= 0:
            return None
        if s not in self._jitters:
            self._jitters[s] = v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))
        return self._jitters[s]

    def crop_box(self, image: torch.Tensor, strength: float = 1.0) -> Box:
        """A random-resized-crop box (top, left, height, width) of ``image`` [C, H, W]."""
        low = 1.0 - (1.0 - self.min_scale) * strength
        return tuple(int(v) for v in RandomResizedCrop.get_params(image, [low, 1.0], list(_RATIO)))

    def crop_pair(self, image: torch.Tensor, strength: float = 1.0, candidates: int = 1) -> tuple[Box, Box]:
        """Two crop boxes: the least-overlapping of ``candidates`` random pairs (one pair: plain)."""
        pairs = [(self.crop_box(image, strength), self.crop_box(image, strength)) for _ in range(max(1, candidates))]
        return pairs[hardest_pair(pairs)] if len(pairs) > 1 else pairs[0]

    def view(
        self,
        image: torch.Tensor,
        box: Box,
        *,
        size: int | None = None,
        strength: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 [3, size, size] view, its uint8 [size, size] mask or None) of the uint8
        ``image`` [3, H, W] (and ``mask`` [H, W]) cropped to ``box``: the mask gets the same
        crop (nearest neighbour) and flip, no colour change."""
        size = int(size or self.image_size)
        top, left, height, width = box
        view = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            view = TF.horizontal_flip(view)
        out_mask = None
        if mask is not None:
            out_mask = TF.resized_crop(
                mask[None], top, left, height, width, [size, size], interpolation=InterpolationMode.NEAREST
            )[0]
            if flip:
                out_mask = out_mask.flip(-1)
        jitter = self._jitter(strength)
        if jitter is not None and bool(torch.rand(()) < 0.8):
            view = jitter(view)
        if bool(torch.rand(()) < 0.2 * strength):
            view = TF.rgb_to_grayscale(view, num_output_channels=3)
        view = TF.normalize(TF.to_dtype(view, torch.float32, scale=True), list(self.mean), list(self.std))
        return view, out_mask

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """One augmented view: float32 [3, image_size, image_size]."""
        image = _as_uint8(img)
        return self.view(image, self.crop_box(image))[0]

    def two_views(
        self,
        img: Image.Image | torch.Tensor,
        *,
        size: int | None = None,
        strength: float = 1.0,
        candidates: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of ``img`` (from the hardest of ``candidates`` crop pairs)."""
        image = _as_uint8(img)
        box1, box2 = self.crop_pair(image, strength, candidates)
        return (
            self.view(image, box1, size=size, strength=strength)[0],
            self.view(image, box2, size=size, strength=strength)[0],
        )

    def two_views_with_masks(
        self,
        img: Image.Image | torch.Tensor,
        mask: torch.Tensor,
        *,
        size: int | None = None,
        strength: float = 1.0,
        candidates: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view1, view2, mask1, mask2): two views and the label map ``mask`` [H, W] (uint8, one
        label per segment, same size as the image) cropped and flipped with each."""
        image = _as_uint8(img)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape[-2:])}")
        box1, box2 = self.crop_pair(image, strength, candidates)
        view1, mask1 = self.view(image, box1, size=size, strength=strength, mask=mask)
        view2, mask2 = self.view(image, box2, size=size, strength=strength, mask=mask)
        return view1, view2, mask1, mask2


def _as_uint8(img: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(img, Image.Image):
        return TF.pil_to_tensor(img.convert("RGB"))
    return img


def two_views(img: Image.Image, image_size: int = 32, color_jitter: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two SimCLR views of ``img`` at ``image_size`` (builds a ``ViewAugment`` per call; hold one
    ``ViewAugment`` in loops)."""
    return ViewAugment(image_size, color_jitter).two_views(img)
