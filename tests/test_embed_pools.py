"""Small pools for the embed tests: good shards, one sample of each bad kind, and broken tars.

The helpers here are imported by the other test_embed_* modules; the test checks that what they
plant is what they say (so a count matching in another test is a count of the planted kinds).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from sept.data.samples import ShardStats, iter_samples


def jpeg(rng: np.random.Generator, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny valid PNG whose header (with a correct CRC) claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", width, height)
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


def write_good_shard(path: str, n: int, *, seed: int, size: int = 32, prefix: str = "") -> list[str]:
    rng = np.random.default_rng(seed)
    keys = []
    with wds.TarWriter(path) as sink:
        for i in range(n):
            key = f"{prefix}{seed:03d}_{i:05d}"
            sink.write({"__key__": key, "jpg": jpeg(rng, size), "json": b"{}"})
            keys.append(key)
    return keys


BAD_IN_SHARD = {
    "bad_undecodable": "undecodable",
    "bad_zero": "zero_byte",
    "bad_noimage": "no_image",
    "bad_bomb": "too_large",
}
"""Planted by write_bad_kinds_shard: key -> the kind of bad sample it is."""


def write_bad_kinds_shard(path: str, *, seed: int = 7) -> int:
    """Good samples around one of each in-shard bad kind; returns the number of good samples."""
    rng = np.random.default_rng(seed)
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "good_a", "jpg": jpeg(rng), "json": b"{}"})
        sink.write({"__key__": "bad_undecodable", "jpg": b"\xff\xd8 definitely not a jpeg", "json": b"{}"})
        sink.write({"__key__": "good_b", "jpg": jpeg(rng), "json": b"{}"})
        sink.write({"__key__": "bad_zero", "jpg": b"", "json": b"{}"})
        sink.write({"__key__": "bad_noimage", "json": b"{}", "txt": b"a caption, no picture"})
        sink.write({"__key__": "bad_bomb", "png": bomb_png(), "json": b"{}"})
        sink.write({"__key__": "good_c", "jpg": jpeg(rng), "json": b"{}"})
    return 3


def write_truncated_shard(path: str, *, seed: int = 8, n: int = 4) -> int:
    """n good samples, cut in the middle of the last image: returns the complete samples before the cut."""
    full = path + ".whole"
    write_good_shard(full, n, seed=seed, prefix="trunc")
    data = Path(full).read_bytes()
    with tarfile.open(full) as tar:
        last = tar.getmembers()[-2]  # the last sample's jpg (its json follows)
    cut = last.offset_data + last.size // 2
    with open(path, "wb") as f:
        f.write(data[:cut])
    return n - 1


def write_non_adjacent_shard(path: str, *, seed: int = 9) -> None:
    """A tar whose members of key 'split_key' are not adjacent: a shard-level fault."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for name, data in [("split_key.jpg", jpeg(rng)), ("other.jpg", jpeg(rng)), ("split_key.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_planted_pools_hold_what_they_claim(tmp_path):
    good = write_bad_kinds_shard(str(tmp_path / "kinds.tar"))
    samples = list(iter_samples(str(tmp_path / "kinds.tar")))
    assert len(samples) == good + len(BAD_IN_SHARD)
    kept = write_truncated_shard(str(tmp_path / "trunc.tar"))
    stats = ShardStats()
    assert len(list(iter_samples(str(tmp_path / "trunc.tar"), stats))) == kept
    assert stats.truncated and stats.bad == 1
