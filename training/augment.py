"""SimCLR-style view augmentations that hold up on small (16-64 px) images, made a batch at a time.

A batch's views are drawn and made together: every sample's random numbers come from its key
(``sept.training.keyed_random``: the run's seed, the epoch and the sample), the crops of all
samples of one image size are resampled by one ``roi_align`` call, and the colour change and
normalisation run once on the stacked views (``sept.training.colour``). Made view by view, the
same work took about 30 ms for a batch of 64 at 16 px, a third of a CPU training step.

Random resized crop follows torchvision's ``RandomResizedCrop.get_params`` (ten tries, then a
centre crop), resampled with area averaging when it shrinks (``roi_align`` with adaptive
sampling), bilinearly when it enlarges. Gaussian blur is left out: at 32 px it erases the image
(SimCLR's CIFAR recipe drops it too).

Views can be made at a smaller ``size`` and a weaker ``strength`` (progressive resizing and
magnitude), from the hardest of several candidate crop pairs (hard positive mining), and with a
segmentation mask cropped (nearest neighbour) and flipped exactly like its image (DetCon); see
``sept.training.acceleration`` for the schedules that choose these per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from sept.training.acceleration import hardest_pairs
from sept.training.colour import NUM_PARAMS, apply_colour, colour_params
from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD
from sept.training.keyed_random import keyed_uniforms

_RATIO = (3 / 4, 4 / 3)
_TRIES = 10  # RandomResizedCrop's attempts before its centre-crop fallback
_CROP_DRAWS = 2 * _TRIES + 2  # per box: scale and log-ratio per try, then top and left
_VIEW_DRAWS = 1 + NUM_PARAMS  # per view: the flip, then the colour parameters
CROP_STREAM, VIEW_STREAM = 0, 1
"""``keyed_uniforms`` streams of the crop boxes and of the flips and colours."""


def crop_boxes(heights: np.ndarray, widths: np.ndarray, u: np.ndarray, min_scale: float) -> np.ndarray:
    """int64 [N, 4] random-resized-crop boxes (top, left, height, width) of images [N] sized
    ``heights`` x ``widths``, from uniforms ``u`` [N, 2 * 10 + 2] (scale and aspect ratio per
    try, then the position), with area scale in [``min_scale``, 1] and ratio in [3/4, 4/3]."""
    h_img, w_img = np.asarray(heights, dtype=np.float64)[:, None], np.asarray(widths, dtype=np.float64)[:, None]
    target = h_img * w_img * (min_scale + (1.0 - min_scale) * u[:, :_TRIES])
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, _TRIES : 2 * _TRIES])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = ok.argmax(1)
    rows = np.arange(len(u))
    found = ok[rows, first]
    h, w = h[rows, first], w[rows, first]
    h_img, w_img = h_img[:, 0], w_img[:, 0]
    top = np.floor(u[:, 2 * _TRIES] * (h_img - h + 1))
    left = np.floor(u[:, 2 * _TRIES + 1] * (w_img - w + 1))
    # torchvision's fallback: the largest centred crop whose ratio is within bounds.
    in_ratio = w_img / h_img
    fw = np.where(in_ratio < _RATIO[0], w_img, np.where(in_ratio > _RATIO[1], np.round(h_img * _RATIO[1]), w_img))
    fh = np.where(in_ratio < _RATIO[0], np.round(w_img / _RATIO[0]), h_img)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.where(found, top, (h_img - h) // 2)
    left = np.where(found, left, (w_img - w) // 2)
    return np.stack([top, left, h, w], 1).astype(np.int64)


class ViewPlan(NamedTuple):
    """What two views of each of N samples are made of."""

    boxes: np.ndarray
    """int64 [N, 2, 4]: each view's crop (top, left, height, width)."""
    flips: np.ndarray
    """bool [N, 2]: whether each view is mirrored."""
    colours: torch.Tensor
    """float32 [N, 2, NUM_PARAMS] (``sept.training.colour.colour_params``)."""


class Views(NamedTuple):
    view1: torch.Tensor
    """float32 [N, 3, S, S], normalised."""
    view2: torch.Tensor
    mask1: torch.Tensor | None
    """uint8 [N, S, S]: view1's crop of the samples' masks (DetCon), else None."""
    mask2: torch.Tensor | None


@dataclass
class ViewAugment:
    """Random resized crop, horizontal flip, colour jitter (``color_jitter`` = SimCLR strength s:
    brightness/contrast/saturation 0.8s, hue 0.2s, applied with p=0.8) and grayscale (p=0.2),
    then normalisation with ``mean``/``std``.

    ``strength`` m in (0, 1] scales the jitter strength and grayscale probability by m and
    raises the crop's minimum scale to ``1 - (1 - min_scale) * m``."""

    image_size: int
    color_jitter: float = 0.5
    min_scale: float = 0.2
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def plan(
        self, keys: np.ndarray, heights: np.ndarray, widths: np.ndarray, *, strength: float = 1.0, candidates: int = 1
    ) -> ViewPlan:
        """Two views' crops, flips and colours for each sample of ``keys`` (uint64 [N],
        ``sept.training.keyed_random.sample_keys``) and image size; with ``candidates`` > 1, the
        least-overlapping of that many crop pairs (hard positive mining)."""
        keys = np.asarray(keys, dtype=np.uint64)
        n, c = len(keys), max(1, int(candidates))
        low = 1.0 - (1.0 - self.min_scale) * strength
        u = keyed_uniforms(keys, c * 2 * _CROP_DRAWS, CROP_STREAM).reshape(n * c * 2, _CROP_DRAWS)
        repeat = c * 2
        boxes = crop_boxes(np.repeat(heights, repeat), np.repeat(widths, repeat), u, low).reshape(n, c, 2, 4)
        boxes = boxes[np.arange(n), hardest_pairs(boxes)]
        v = keyed_uniforms(keys, 2 * _VIEW_DRAWS, VIEW_STREAM).reshape(n * 2, _VIEW_DRAWS)
        colours = colour_params(v[:, 1:], self.color_jitter, strength).view(n, 2, NUM_PARAMS)
        return ViewPlan(boxes, (v[:, 0] < 0.5).reshape(n, 2), colours)

    def views(
        self,
        images: Sequence[torch.Tensor],
        keys: np.ndarray,
        *,
        size: int | None = None,
        strength: float = 1.0,
        candidates: int = 1,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> Views:
        """Two normalised views of each uint8 image [3, H, W] of ``images`` at ``size`` px (default
        ``image_size``), drawn from the samples' ``keys``; with ``masks`` (uint8 [H, W] each),
        the masks cropped and flipped with each view."""
        heights = np.array([im.shape[-2] for im in images])
        widths = np.array([im.shape[-1] for im in images])
        plan = self.plan(keys, heights, widths, strength=strength, candidates=candidates)
        return self.render(images, plan, size=size, masks=masks)

    def render(
        self,
        images: Sequence[torch.Tensor],
        plan: ViewPlan,
        *,
        size: int | None = None,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> Views:
        """The views ``plan`` describes of uint8 ``images`` [3, H, W] (and ``masks`` [H, W])."""
        size = int(size or self.image_size)
        n = len(images)
        heights = np.array([im.shape[-2] for im in images])
        widths = np.array([im.shape[-1] for im in images])
        pixels = torch.empty(n, 2, 3, size, size)
        cut = torch.zeros(n, 2, size, size, dtype=torch.uint8) if masks is not None else None
        # One resampling call per image size: img2dataset pools have one, or a few.
        for h, w in sorted(set(zip(heights.tolist(), widths.tolist()))):
            group = np.flatnonzero((heights == h) & (widths == w))
            stack = torch.stack([images[i] for i in group]).float()
            b = plan.boxes[group].reshape(-1, 4).astype(np.float64)  # rows: sample, view
            rois = np.stack(
                [np.repeat(np.arange(len(group)), 2), b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], 1
            )
            crops = roi_align(stack, torch.from_numpy(rois).float(), (size, size), 1.0, -1, True)
            pixels[torch.from_numpy(group)] = crops.view(len(group), 2, 3, size, size)
            if cut is not None:
                cut[torch.from_numpy(group)] = _nearest_crops(
                    torch.stack([masks[i] for i in group]), plan.boxes[group], size
                )
        flips = torch.from_numpy(plan.flips)
        pixels = torch.where(flips[:, :, None, None, None], pixels.flip(-1), pixels)
        finished = self.finish(pixels.view(n * 2, 3, size, size).clamp_(0, 255), plan.colours.view(n * 2, -1))
        finished = finished.view(n, 2, 3, size, size)
        if cut is not None:
            cut = torch.where(flips[:, :, None, None], cut.flip(-1), cut)
            return Views(finished[:, 0], finished[:, 1], cut[:, 0], cut[:, 1])
        return Views(finished[:, 0], finished[:, 1], None, None)

    def finish(self, pixels: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        """Float32 views [N, 3, S, S]: ``pixels`` (uint8, or float in [0, 255]) after their
        ``colour`` parameters, normalised with ``mean``/``std``."""
        x = pixels if pixels.dtype == torch.uint8 else pixels / 255.0
        return TF.normalize(apply_colour(x, colour), list(self.mean), list(self.std))

    def two_views(
        self, img: Image.Image | torch.Tensor, *, size: int | None = None, strength: float = 1.0, candidates: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views [3, size, size] of one image, keyed by a draw from torch's global RNG."""
        key = np.array([torch.randint(0, 2**62, ()).item()], dtype=np.uint64)
        out = self.views([as_uint8(img)], key, size=size, strength=strength, candidates=candidates)
        return out.view1[0], out.view2[0]


def _nearest_crops(masks: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [G, 2, size, size]: each of ``masks`` [G, H, W] cropped to its two ``boxes``
    [G, 2, 4] and resized by nearest neighbour (``F.interpolate``'s index rule)."""
    steps = np.arange(size)
    ys = boxes[..., 0:1] + np.floor(steps * boxes[..., 2:3] / size).astype(np.int64)  # [G, 2, size]
    xs = boxes[..., 1:2] + np.floor(steps * boxes[..., 3:4] / size).astype(np.int64)
    g = torch.arange(len(masks))[:, None, None, None]
    return masks[g, torch.from_numpy(ys)[..., :, None], torch.from_numpy(xs)[..., None, :]]


def as_uint8(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] of a PIL image (converted to RGB) or of a tensor already so."""
    if isinstance(img, Image.Image):
        return TF.pil_to_tensor(img.convert("RGB"))
    return img


def two_views(img: Image.Image, image_size: int = 32, color_jitter: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two SimCLR views of ``img`` at ``image_size`` (builds a ``ViewAugment`` per call; hold one
    ``ViewAugment`` in loops)."""
    return ViewAugment(image_size, color_jitter).two_views(img)
