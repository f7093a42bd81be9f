"""The icon retrieval benchmark's data: Debian's Oxygen icons as the pool, Tango's as the target.

Pool: every Oxygen PNG at 32, 48 and 64 px, composited on white, written as img2dataset-style
WebDataset shards (``KEY.png``, ``KEY.json``); the same icon at three sizes gives real
near-duplicates. Target: Tango's 32x32 ``devices`` and ``places`` icons (one file per distinct
image: Tango ships many aliases), alternating into ``train/`` and ``val/``. Truth: the category
folder of every pool key, kept aside in ``truth.json`` and never inside a sample.

Only the benchmark knows about icons; sept's stages see an ordinary pool and target task.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import webdataset as wds
from PIL import Image

ICON_ROOT = "/usr/share/icons"
PACKAGES = {"oxygen": "oxygen-icon-theme", "Tango": "tango-icon-theme"}
POOL_SIZES = (32, 48, 64)
TARGET_SIZE = 32
RELEVANT = ("devices", "places")
PER_SHARD = 500
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class IconCorpus:
    root: str
    pool_spec: str
    target_dir: str
    truth: dict[str, str]
    """pool key -> category folder (``devices``, ``places``, ``apps``, ...)."""
    relevant: tuple[str, ...] = RELEVANT

    def base_rate(self) -> float:
        return sum(c in self.relevant for c in self.truth.values()) / len(self.truth)


def ensure_icon_themes(root: str = ICON_ROOT) -> None:
    """Installs the two icon themes with apt-get when either is missing."""
    missing = [pkg for theme, pkg in PACKAGES.items() if not os.path.isdir(os.path.join(root, theme))]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)


def _on_white(path: str) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im).convert("RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def pool_files(root: str = ICON_ROOT) -> list[tuple[str, str, int]]:
    """(path, category, size) of every Oxygen PNG at ``POOL_SIZES``, in a fixed order."""
    files = []
    for size in POOL_SIZES:
        base = os.path.join(root, "oxygen", "base", f"{size}x{size}")
        for category in sorted(os.listdir(base)):
            folder = os.path.join(base, category)
            for name in sorted(os.listdir(folder)):
                if name.endswith(".png") and os.path.exists(os.path.join(folder, name)):
                    files.append((os.path.join(folder, name), category, size))
    return files


def target_files(root: str = ICON_ROOT) -> dict[str, list[str]]:
    """Category -> Tango 32x32 PNGs, one per distinct image (aliases and identical copies dropped)."""
    out = {}
    for category in RELEVANT:
        folder = os.path.join(root, "Tango", f"{TARGET_SIZE}x{TARGET_SIZE}", category)
        seen: set[str] = set()
        kept = []
        real = {os.path.realpath(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".png")}
        for path in sorted(p for p in real if os.path.isfile(p)):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                kept.append(path)
        out[category] = kept
    return out


def make_icon_corpus(out: str, root: str = ICON_ROOT) -> IconCorpus:
    """Writes (once) the pool shards, the target ImageFolder and truth.json under ``out``."""
    out = os.path.abspath(out)
    done = os.path.join(out, "corpus.json")
    if os.path.exists(done):
        with open(done) as f:
            meta = json.load(f)
        if meta.get("version") == LAYOUT_VERSION:
            with open(os.path.join(out, "truth.json")) as f:
                truth = json.load(f)
            return IconCorpus(out, meta["pool_spec"], os.path.join(out, "target"), truth)
    ensure_icon_themes(root)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".icons-", dir=os.path.dirname(out) or ".")
    try:
        files = pool_files(root)
        os.makedirs(os.path.join(tmp, "pool"))
        truth: dict[str, str] = {}
        n_shards = -(-len(files) // PER_SHARD)
        for shard in range(n_shards):
            with wds.TarWriter(os.path.join(tmp, "pool", f"{shard:05d}.tar")) as writer:
                for i, (path, category, _size) in enumerate(files[shard * PER_SHARD : (shard + 1) * PER_SHARD]):
                    key = f"{shard:05d}{i:04d}"
                    img = _on_white(path)
                    meta = {
                        "key": key,
                        "width": img.width,
                        "height": img.height,
                        "status": "success",
                        "url": f"file://{os.path.basename(path)}",
                    }
                    writer.write({"__key__": key, "png": _png_bytes(img), "json": json.dumps(meta).encode()})
                    truth[key] = category
        for category, paths in target_files(root).items():
            for i, path in enumerate(paths):
                split = "train" if i % 2 == 0 else "val"
                folder = os.path.join(tmp, "target", split, category)
                os.makedirs(folder, exist_ok=True)
                _on_white(path).save(os.path.join(folder, os.path.basename(path)))
        with open(os.path.join(tmp, "truth.json"), "w") as f:
            json.dump(truth, f)
        pool_spec = os.path.join(out, "pool", f"{{00000..{n_shards - 1:05d}}}.tar")
        with open(os.path.join(tmp, "corpus.json"), "w") as f:
            json.dump({"version": LAYOUT_VERSION, "pool_spec": pool_spec, "pool_images": len(files)}, f)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return make_icon_corpus(out, root)
