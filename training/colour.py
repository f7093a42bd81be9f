"""Batched colour distortion: SimCLR's colour jitter and random grayscale for a whole batch of
views in one pass of tensor arithmetic, each view with its own random factors.

Run view by view through torchvision's ``ColorJitter``, this was most of the loader's time at
16 to 32 px (about 10 small ops per view, plus their dispatch). Here the factors are drawn per
view from its sample's keyed uniforms (``sept.training.keyed_random``, so a view still depends
on its sample alone), and applied to the stacked batch at once.

Same distributions as torchvision's ``ColorJitter(0.8s, 0.8s, 0.8s, min(0.2s, 0.5))`` applied with
probability 0.8, then grayscale with probability ``0.2 * strength``. One departure: the four
adjustments run in a fixed order (brightness, contrast, saturation, hue), not a random one.
"""

from __future__ import annotations

import numpy as np
import torch

# Columns of a colour-parameter row.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAYSCALE = range(6)
NUM_PARAMS = 6
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def colour_params(u: np.ndarray, color_jitter: float, strength: float = 1.0) -> torch.Tensor:
    """Views' colour parameters [N, NUM_PARAMS] from uniforms ``u`` [N, NUM_PARAMS] in [0, 1):
    whether to jitter, the brightness, contrast and saturation factors, the hue shift, whether
    to gray out."""
    s = float(color_jitter) * float(strength)
    u = np.asarray(u, dtype=np.float64)
    spread = 0.8 * s
    low = max(0.0, 1.0 - spread)
    params = np.empty((len(u), NUM_PARAMS), dtype=np.float32)
    params[:, JITTER] = (u[:, JITTER] < 0.8) & (s > 0)
    for col in (BRIGHTNESS, CONTRAST, SATURATION):
        params[:, col] = low + (1.0 + spread - low) * u[:, col]
    params[:, HUE] = (2.0 * u[:, HUE] - 1.0) * min(0.2 * s, 0.5)
    params[:, GRAYSCALE] = u[:, GRAYSCALE] < 0.2 * float(strength)
    return torch.from_numpy(params)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of float RGB ``x`` [N, 3, H, W]."""
    weights = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _per_view(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Float RGB ``x`` [N, 3, H, W] in [0, 1] with each view's hue rotated by ``shift`` [N] turns."""
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    r, g, b = ((maxc - c) / safe for c in x.unbind(1))
    hue = torch.stack([b - g, 2.0 + r - b, 4.0 + g - r], 1).gather(1, argmax[:, None])[:, 0]
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    sector = hue * 6.0
    i = torch.floor(sector)
    f = sector - i
    i = i.long() % 6
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    # (r, g, b) by hue sector, as in colorsys.hsv_to_rgb
    table = torch.stack(
        [
            torch.stack([v, q, p, p, t, v], 1),
            torch.stack([t, v, v, q, p, p], 1),
            torch.stack([p, p, t, v, v, q], 1),
        ],
        1,
    )  # [N, 3, 6, H, W]
    index = i[:, None, None].expand(-1, 3, 1, -1, -1)
    return table.gather(2, index)[:, :, 0]


def apply_colour(views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Float views [N, 3, H, W] in [0, 1] after each one's colour ``params`` [N, NUM_PARAMS]
    (``colour_params``); ``views`` may be uint8 or float in [0, 1]."""
    x = views.float() / 255.0 if views.dtype == torch.uint8 else views.float()
    params = params.to(x.device, x.dtype)
    if bool(params[:, JITTER].any()):
        jittered = (x * _per_view(params[:, BRIGHTNESS])).clamp(0, 1)
        mean = grayscale(jittered).mean(dim=(1, 2, 3), keepdim=True)
        c = _per_view(params[:, CONTRAST])
        jittered = (jittered * c + mean * (1 - c)).clamp(0, 1)
        s = _per_view(params[:, SATURATION])
        jittered = (jittered * s + grayscale(jittered) * (1 - s)).clamp(0, 1)
        jittered = shift_hue(jittered, params[:, HUE])
        x = torch.where(_per_view(params[:, JITTER]) > 0, jittered, x)
    if bool(params[:, GRAYSCALE].any()):
        x = torch.where(_per_view(params[:, GRAYSCALE]) > 0, grayscale(x).expand_as(x), x)
    return x
