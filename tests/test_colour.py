"""Batched colour distortion (training/colour.py) against torchvision's per-image functions."""

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from sept.training.colour import (
    BRIGHTNESS,
    CONTRAST,
    GRAYSCALE,
    HUE,
    JITTER,
    NUM_PARAMS,
    SATURATION,
    apply_colour,
    colour_params,
    shift_hue,
)


def _draw(n, color_jitter=1.0, strength=1.0, seed=0):
    return colour_params(np.random.default_rng(seed).random((n, NUM_PARAMS)), color_jitter, strength)


def _images(n=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    if n > 1:
        x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5])  # gray: no hue
        x[1, :, 0, 0] = torch.tensor([1.0, 1.0, 0.0])  # a tie between red and green
    return x


def test_hue_shift_matches_torchvision_per_view():
    x = _images()
    shifts = torch.tensor([0.0, 0.1, -0.2, 0.45, 0.3, -0.5])
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(len(x))])
    assert torch.allclose(shift_hue(x, shifts), expected, atol=1e-5)


def test_jitter_matches_torchvision_in_fixed_order():
    x = _images()
    params = _draw(len(x), seed=1)
    params[:, JITTER], params[:, GRAYSCALE] = 1.0, 0.0
    expected = []
    for i in range(len(x)):
        y = TF.adjust_brightness(x[i], float(params[i, BRIGHTNESS]))
        y = TF.adjust_contrast(y, float(params[i, CONTRAST]))
        y = TF.adjust_saturation(y, float(params[i, SATURATION]))
        expected.append(TF.adjust_hue(y, float(params[i, HUE])))
    # float rounding differs in the hue round trip; a quarter of one 8-bit level is far below it
    assert torch.allclose(apply_colour(x, params), torch.stack(expected), atol=1e-3)


def test_views_without_jitter_or_grayscale_are_unchanged_and_grayscale_is_gray():
    x = (_images() * 255).round().to(torch.uint8)
    params = _draw(len(x))
    params[:, JITTER] = 0.0
    params[:, GRAYSCALE] = torch.tensor([1.0, 0, 1, 0, 0, 0])
    out = apply_colour(x, params)
    assert torch.equal(out[1], x[1].float() / 255)
    assert torch.allclose(out[0, 0], out[0, 1]) and torch.allclose(out[0, 1], out[0, 2])
    assert not torch.allclose(out[3, 0], out[3, 1])


def test_draws_follow_strength():
    none = _draw(200, color_jitter=0.0)
    assert none[:, JITTER].sum() == 0  # no jitter strength: never jittered
    strong = _draw(2000)
    assert 0.75 < strong[:, JITTER].mean() < 0.85
    assert 0.17 < strong[:, GRAYSCALE].mean() < 0.23
    assert strong[:, BRIGHTNESS].min() >= 0.2 - 1e-6 and strong[:, BRIGHTNESS].max() <= 1.8 + 1e-6
    assert strong[:, HUE].abs().max() <= 0.2 + 1e-6
    weak = _draw(2000, strength=0.25)
    assert weak[:, BRIGHTNESS].min() >= 0.8 - 1e-6 and weak[:, HUE].abs().max() <= 0.05 + 1e-6
    assert weak[:, GRAYSCALE].mean() < 0.09
