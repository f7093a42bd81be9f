"""Image decoding and the per-sample skip-and-count policy.

Every stage that turns pool bytes into pixels goes through ``decode_sample``: a sample without an
image, with empty or undecodable bytes, or with a header claiming more than ``max_pixels`` is
skipped and recorded in the shard's ``ShardStats`` with a short reason, never fatal.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sept.data.samples import PoolSample, ShardStats, image_member

DEFAULT_MAX_PIXELS = 64_000_000
_MAX_REASON_CHARS = 160


class BadSample(Exception):
    """A sample that cannot be used; ``str(err)`` is a short reason for the skip record."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes to an RGB ``PIL.Image``; raises ``BadSample`` for bytes that cannot be used.

    The size in the header is checked before pixels are decoded, so a decompression bomb costs
    only a header read. Transparent images are flattened onto white.
    """
    if not data:
        raise BadSample("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadSample(_short(f"image too large: {err}")) from None
    except Image.UnidentifiedImageError:
        raise BadSample("undecodable image: not a known image format") from None
    except Exception as err:  # any decoder failure on untrusted bytes is a bad sample
        raise BadSample(_short(f"undecodable image: {type(err).__name__}: {err}")) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(f"image too large: {width}x{height} pixels > {max_pixels}")
    if width == 0 or height == 0:
        raise BadSample(f"empty image: {width}x{height} pixels")
    try:
        image.load()
        return _to_rgb(image)
    except Image.DecompressionBombError as err:
        raise BadSample(_short(f"image too large: {err}")) from None
    except Exception as err:
        raise BadSample(_short(f"corrupt image data: {type(err).__name__}: {err}")) from None


def decode_sample(sample: PoolSample, stats: ShardStats, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | None:
    """The sample's image as RGB, or None after recording why it was skipped in ``stats``."""
    found = image_member(sample)
    if found is None:
        members = ", ".join(sorted(sample.members)) or "none"
        stats.add_bad(sample.key, f"no image member (members: {members})")
        return None
    ext, data = found
    try:
        return decode_image(data, max_pixels=max_pixels)
    except BadSample as err:
        stats.add_bad(sample.key, f"{ext}: {err}")
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grey: keep the top 8 bits rather than letting convert() clip everything to white.
        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _short(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."
