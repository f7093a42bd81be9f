"""Where sept's bytes live: a local path, or an fsspec URL (``s3://``, ``gs://``, ``az://``, ...).

Every stage names its inputs and outputs by one string. A string with a scheme is read and
written through fsspec; ``file://`` is turned into a plain local path at the door, so local files
always take the POSIX code paths (renames, fsync, locks). Object-store credentials and endpoints
come from the environment, as fsspec and the cloud SDKs read them (``AWS_*``, and fsspec's
``FSSPEC_<PROTOCOL>_<OPTION>``, e.g. ``FSSPEC_S3_ENDPOINT_URL``); ``forwarded_environment`` names
the variables a Ray worker needs to see the same store as its driver.

An object store has no directories and no rename: a "folder" is a key prefix, which exists once
any object under it does. So a reader there never trusts a prefix; it trusts a file that the
writer puts last (``sept.io`` publishes a folder's root ``zarr.json`` after everything else).
"""

from __future__ import annotations

import os
import posixpath
from typing import IO

from sept.errors import SeptError

FILE_SCHEME = "file://"
# The driver's settings for object stores that Ray workers must share to open the same URLs.
_FORWARDED_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "GCS", "AZURE_", "BOTO_")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object in an fsspec file system rather than a local file."""
    return "://" in os.fspath(path) and not os.fspath(path).startswith(FILE_SCHEME)


def resolve(path: str | os.PathLike) -> str:
    """The canonical name of ``path``: an absolute local path, or the URL without a trailing slash."""
    path = os.fspath(path)
    if path.startswith(FILE_SCHEME):
        path = path[len(FILE_SCHEME) :]
    if is_url(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def filesystem(url: str):
    """(fsspec file system, path within it) for a URL; listing caches are dropped, since other
    writers (Ray workers, an earlier run) change the store behind this process's back."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise SeptError(f"cannot open {url}: {err}") from None
    fs.invalidate_cache()
    return fs, path


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = filesystem(path)
    return fs.exists(p)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = filesystem(path)
    return fs.isfile(p)


def isdir(path: str) -> bool:
    """A local directory, or a URL prefix that holds at least one object."""
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = filesystem(path)
    return fs.isdir(p)


def listdir(path: str) -> list[str]:
    """Entry names directly under ``path`` (files and sub-prefixes), unsorted; [] if there is none."""
    if not is_url(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs, p = filesystem(path)
    try:
        return [posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)]
    except FileNotFoundError:
        return []


def glob(pattern: str) -> list[str]:
    """Sorted URLs (or paths) matching a glob pattern."""
    if not is_url(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern))
    fs, p = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    return sorted(f"{protocol}://{m}" for m in fs.glob(p) if fs.isfile(m))


def size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, p = filesystem(path)
    return int(fs.size(p))


def open_file(path: str, mode: str = "rb", **kwargs) -> IO:
    """``open`` for a local path or a URL (reading; writes go through ``sept.io``, which is atomic)."""
    if not is_url(path):
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        return open(path, mode, **kwargs)  # noqa: SIM115 - the caller owns the handle
    fs, p = filesystem(path)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return fs.open(p, mode, **kwargs)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def makedirs(path: str) -> None:
    """Create a local directory (and parents); an object store needs none."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Delete one file or object; a missing one is not an error."""
    if not is_url(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        return
    fs, p = filesystem(path)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


def remove_tree(path: str) -> None:
    if not is_url(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = filesystem(path)
    try:
        fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass


def put_file(local: str, url: str) -> None:
    """Upload one local file. A single PUT is atomic on object stores: the object appears whole."""
    fs, p = filesystem(url)
    fs.put_file(local, p)


def zarr_store(path: str, *, read_only: bool = False):
    """What ``zarr.open_group`` takes for ``path``: the path itself, or an fsspec-backed store."""
    if not is_url(path):
        return path
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(path, read_only=read_only)
    except (ImportError, ValueError, TypeError) as err:
        raise SeptError(f"cannot open Zarr store {path}: {err}") from None


def forwarded_environment() -> dict[str, str]:
    """The driver's object-store settings (credentials, endpoints), for Ray workers' runtime_env."""
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIXES)}
