"""Decoding pool images and the skip-and-count policy for bad samples."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sept.data.decode import BadSample, decode_image, decode_sample
from sept.data.samples import PoolSample, ShardStats


def _encode(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_claiming_size(width, height):
    """A valid little PNG whose header (with a correct CRC) claims width x height pixels."""
    data = bytearray(_encode(Image.new("L", (8, 8))))
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", width, height)
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


def test_decodes_jpeg_png_webp_to_rgb():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(12, 20, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG", "WEBP"):
        image = decode_image(_encode(Image.fromarray(pixels), fmt))
        assert image.mode == "RGB" and image.size == (20, 12)
    exact = decode_image(_encode(Image.fromarray(pixels), "PNG"))
    np.testing.assert_array_equal(np.asarray(exact), pixels)


def test_grey_sixteen_bit_and_transparent_images_become_sensible_rgb():
    grey16 = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)
    out = np.asarray(decode_image(_encode(grey16)))
    assert out.shape == (8, 8, 3)
    assert out[0, 1, 0] == 4 and out[-1, -1, 0] == 252  # top byte kept, not clipped to white
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert tuple(np.asarray(decode_image(_encode(clear)))[0, 0]) == (255, 255, 255)
    assert decode_image(_encode(Image.new("L", (4, 4), 9))).getpixel((0, 0)) == (9, 9, 9)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty image bytes"),
        (b"definitely not an image", "undecodable"),
        (_encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "undecodable"),  # cut in the header
        (_encode(Image.effect_noise((64, 64), 80), "JPEG")[:-600], "corrupt image data"),
        (_png_claiming_size(9000, 9000), "too large: 9000x9000"),
        (_png_claiming_size(30000, 30000), "too large"),  # PIL's own bomb guard fires first
    ],
)
def test_bad_bytes_raise_bad_sample_with_a_short_reason(data, reason):
    with pytest.raises(BadSample, match=reason) as err:
        decode_image(data)
    assert len(str(err.value)) <= 160 and "\n" not in str(err.value)


def test_max_pixels_is_checked_before_decoding():
    data = _encode(Image.new("RGB", (40, 30)))
    assert decode_image(data, max_pixels=1200).size == (40, 30)
    with pytest.raises(BadSample, match="40x30 pixels > 1199"):
        decode_image(data, max_pixels=1199)


def test_decode_sample_skips_and_counts_bad_samples():
    good_png = _encode(Image.new("RGB", (16, 16), (1, 2, 3)))
    samples = [
        PoolSample("good", 0, {"png": good_png, "json": b"{}"}),
        PoolSample("noimage", 1, {"json": b"{}", "txt": b"caption"}),
        PoolSample("zero", 2, {"jpg": b""}),
        PoolSample("junk", 3, {"webp": b"RIFF...."}),
        PoolSample("bomb", 4, {"png": _png_claiming_size(9000, 9000)}),
    ]
    stats = ShardStats(samples=len(samples))
    images = [decode_sample(s, stats) for s in samples]
    assert images[0].getpixel((0, 0)) == (1, 2, 3)
    assert images[1:] == [None] * 4
    assert stats.bad == 4 and stats.samples == 5
    reasons = dict(stats.bad_samples)
    assert list(reasons) == ["noimage", "zero", "junk", "bomb"]
    assert "no image member (members: json, txt)" == reasons["noimage"]
    assert reasons["zero"].startswith("jpg: empty")
    assert reasons["junk"].startswith("webp: undecodable")
    assert "too large" in reasons["bomb"]
