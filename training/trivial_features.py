"""Trivial image features, the floor any retrieval encoder must clear: a grayscale thumbnail and a
colour histogram.

They learn nothing, so an encoder that retrieves a target's classes no better than they do
brings nothing to a selection. `sept encoder-check` (``sept.training.encoder_check``) and the
retrieval benchmarks (``benchmarks/retrieval_quality.py``) compare encoders with them. Both
return L2-normalised float32 rows, one per image, compared by inner product like an encoder's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image


def grey_thumbnail(images: Sequence[Image.Image], size: int = 16) -> np.ndarray:
    """Mean-centred, L2-normalised grayscale pixels of a ``size`` x ``size`` thumbnail."""
    x = np.stack(
        [np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), np.float32).ravel() for im in images]
    )
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def colour_histogram(images: Sequence[Image.Image], bins: int = 8, size: int = 32) -> np.ndarray:
    """L2-normalised joint RGB histograms (bins^3), white background pixels included."""
    out = np.zeros((len(images), bins**3), dtype=np.float32)
    for i, img in enumerate(images):
        a = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.int64) * bins // 256
        codes = (a[..., 0] * bins + a[..., 1]) * bins + a[..., 2]
        out[i] = np.bincount(codes.ravel(), minlength=bins**3)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


TRIVIAL_FEATURES: dict[str, Callable[[Sequence[Image.Image]], np.ndarray]] = {
    "grayscale 16x16 thumbnail": grey_thumbnail,
    "colour histogram (8x8x8 RGB)": colour_histogram,
}
"""The trivial features by the name tables show them under."""
