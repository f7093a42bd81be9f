"""The pool listing: turns a user's shard spec into the ordered list of shard paths.

The order of this list defines shard indices (and so sample ids, see ``sept.data.identity``),
so it depends only on the spec and on file names, never on the file system's listing order.
A spec may be an fsspec URL (``s3://bucket/pool/{00000..09999}.tar``, a prefix, a glob, a
listing), read through ``sept.storage``; its shards are then URLs.
"""

from __future__ import annotations

import glob
import os

from braceexpand import braceexpand

from sept import storage
from sept.errors import SeptError

SHARD_SUFFIX = ".tar"
LISTING_SUFFIX = ".txt"
_GLOB_CHARS = ("*", "?", "[")


def list_shards(spec: str | os.PathLike | list[str | os.PathLike]) -> list[str]:
    """Absolute shard paths for ``spec``, in a deterministic order.

    ``spec`` is a brace pattern (``pool/{00000..00099}.tar``), a directory (its ``*.tar``, sorted
    by name), a ``.txt`` listing (one shard path or brace pattern per line, relative paths taken
    from the listing's directory, blank and ``#`` lines ignored), a glob, a single shard, or a
    list of these (concatenated in order). Raises ``SeptError`` for a missing or unreadable
    shard, for a spec that matches no shard, and for a shard listed twice.
    """
    parts = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not parts:
        raise SeptError("pool spec is empty: no shards given")
    shards: list[str] = []
    for part in parts:
        shards.extend(_expand(os.fspath(part), base_dir=os.getcwd()))
    if not shards:
        raise SeptError(f"pool spec matches no shard: {spec}")
    _refuse_duplicates(shards)
    return shards


def _expand(spec: str, base_dir: str) -> list[str]:
    spec = spec.strip()
    if not spec:
        raise SeptError("pool spec is empty: no shards given")
    if storage.is_url(spec) or storage.is_url(base_dir) or spec.startswith(storage.FILE_SCHEME):
        return _expand_url(spec, base_dir)
    path = os.path.join(base_dir, os.path.expanduser(spec))
    if "{" in spec and ".." in spec and not os.path.exists(path):
        expanded = [os.path.join(base_dir, p) for p in braceexpand(os.path.expanduser(spec))]
        return [_checked_shard(p) for p in expanded]
    if os.path.isdir(path):
        found = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if name.endswith(SHARD_SUFFIX) and not name.startswith(".") and os.path.isfile(os.path.join(path, name))
        )
        if not found:
            raise SeptError(f"pool spec matches no shard: no *{SHARD_SUFFIX} in directory {path}")
        return [_checked_shard(p) for p in found]
    if spec.endswith(LISTING_SUFFIX) and os.path.isfile(path):
        return _read_listing(path)
    if any(c in spec for c in _GLOB_CHARS) and not os.path.exists(path):
        found = sorted(glob.glob(path))
        if not found:
            raise SeptError(f"pool spec matches no shard: {spec}")
        return [_checked_shard(p) for p in found]
    return [_checked_shard(path)]


def _expand_url(spec: str, base_dir: str) -> list[str]:
    """``_expand`` for a URL (or a line of a listing that lies in an object store)."""
    url = spec if "://" in spec else storage.join(base_dir, spec)
    url = storage.resolve(url)
    if not storage.is_url(url):  # file://: a local path after all
        return _expand(url, base_dir=os.getcwd())
    try:
        if "{" in url and ".." in url and not storage.exists(url):
            return _checked_urls(list(braceexpand(url)))
        if any(c in url for c in _GLOB_CHARS) and not storage.exists(url):
            found = [u for u in storage.glob(url) if u.endswith(SHARD_SUFFIX)]
            if not found:
                raise SeptError(f"pool spec matches no shard: {spec}")
            return found
        if url.endswith(LISTING_SUFFIX) and storage.isfile(url):
            return _read_listing(url)
        if storage.isfile(url):
            return [url]
        if storage.isdir(url):
            names = sorted(n for n in storage.listdir(url) if n.endswith(SHARD_SUFFIX) and not n.startswith("."))
            if not names:
                raise SeptError(f"pool spec matches no shard: no *{SHARD_SUFFIX} under {url}")
            return [storage.join(url, n) for n in names]
    except OSError as err:
        raise SeptError(f"cannot list pool spec {spec}: {err}") from None
    raise SeptError(f"pool shard not found: {url}")


def _checked_urls(urls: list[str]) -> list[str]:
    """The expanded URLs, each checked to exist with one listing per prefix, not one request per shard."""
    present: dict[str, set[str]] = {}
    for url in urls:
        folder = storage.dirname(url)
        if folder not in present:
            present[folder] = set(storage.listdir(folder))
        if storage.basename(url) not in present[folder]:
            raise SeptError(f"pool shard not found: {url}")
    return urls


def _read_listing(listing: str) -> list[str]:
    """Shards named in a text listing, relative lines resolved against the listing's directory."""
    base_dir = storage.dirname(storage.resolve(listing))
    try:
        with storage.open_file(listing, "r") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SeptError(f"cannot read shard listing {listing}: {err}") from None
    shards: list[str] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith(LISTING_SUFFIX):
            raise SeptError(f"shard listing {listing} names another listing: {line}")
        shards.extend(_expand(line, base_dir=base_dir))
    if not shards:
        raise SeptError(f"pool spec matches no shard: listing {listing} names no shard")
    return shards


def _checked_shard(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SeptError(f"pool shard not found: {path}")
    if not os.access(path, os.R_OK):
        raise SeptError(f"pool shard not readable: {path}")
    return path


def _refuse_duplicates(shards: list[str]) -> None:
    # The same file twice would give its samples two ids each and double them in every stage.
    seen: dict[str, str] = {}
    for path in shards:
        real = path if storage.is_url(path) else os.path.realpath(path)
        if real in seen:
            raise SeptError(f"pool shard listed twice: {path} (same file as {seen[real]})")
        seen[real] = path
