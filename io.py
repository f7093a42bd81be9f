"""The one way sept publishes a file or a folder: stage it beside its final name, make it durable, rename.

Every stage's outputs are read by another stage, another rank or a resumed run, so each must be
seen either whole or not at all, even when the writer is killed (SLURM preemption, OOM) mid-write.
A rename within one directory is atomic on POSIX; the fsyncs make the published bytes, and the
rename itself, survive a machine crash, not only a process crash.

One staging-name scheme, ``.{final name}.{8 hex}.tmp`` in the final name's own directory, is used
for files and folders alike, so ``remove_stale_staging`` can clear what dead writers left.

A final name may also be an object-store URL (``sept.storage``). There is no rename there, so a
file is staged on local disk and uploaded in one PUT, which an object store makes visible whole
or not at all; a folder is uploaded file by file with its root ``zarr.json`` last, because that
file is what every reader of a sept store takes as the mark of a complete group.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from sept import storage

STAGING_SUFFIX = ".tmp"
_FILE_MODE = 0o644  # outputs are read by other jobs and users
_DIR_MODE = 0o755


def staging_path(final: str) -> str:
    """A fresh name beside ``final`` for staging it; its parent directory is created.

    For a URL the staged file lies in a fresh local temporary folder (removed when published)."""
    if storage.is_url(final):
        return os.path.join(tempfile.mkdtemp(prefix="sept-stage-"), storage.basename(final))
    directory = os.path.dirname(os.path.abspath(final))
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")


def is_staging_name(name: str) -> bool:
    """Whether a directory entry's name is one that ``staging_path`` makes."""
    return name.startswith(".") and name.endswith(STAGING_SUFFIX)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (a staged folder, before it is published)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _discard(staged: str, final: str) -> None:
    if storage.is_url(final):
        shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
    elif os.path.exists(staged):
        os.unlink(staged)


def _publish(staged: str, final: str) -> None:
    if storage.is_url(final):
        try:
            storage.put_file(staged, final)
        finally:
            shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
        return
    os.replace(staged, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def move_into_place(local: str, final: str) -> None:
    """Publish a finished, durable local file at ``final``: a rename on disk, one upload (then the
    local file removed) to a URL. The caller owns the order in which several files appear."""
    if storage.is_url(final):
        storage.put_file(local, final)
        os.unlink(local)
    else:
        os.replace(local, final)


@contextmanager
def atomic_file(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only when the ``with`` body succeeds.

    On an exception nothing at ``path`` changes and the staged file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files, mode 'w' or 'wb', not {mode!r}")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    tmp = staging_path(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        _publish(tmp, path)
    except BaseException:
        _discard(tmp, path)
        raise


@contextmanager
def atomic_target(path: str) -> Iterator[str]:
    """A staged path for a library that writes a file by name (``torch.save``, a tar writer).

    The caller writes the file at the yielded path; it is published at ``path`` on success.
    """
    tmp = staging_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _FILE_MODE)
        _publish(tmp, path)
    except BaseException:
        _discard(tmp, path)
        raise


def atomic_write_text(path: str, text: str) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Writes ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return path


def atomic_write_json(path: str, obj: Any, **dump_kwargs) -> str:
    """``json.dump(obj)`` to ``path`` atomically (``indent=2`` unless given); returns ``path``."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_file(path, "w") as f:
        json.dump(obj, f, **dump_kwargs)
    return path


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns ``path``."""
    import torch  # here, not at import: most stages that write files need no torch

    with atomic_target(path) as tmp:
        torch.save(obj, tmp)
    return path


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB blocks: how a published file is verified."""
    h = hashlib.sha256()
    size = 0
    with storage.open_file(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def staging_dir(final: str) -> str:
    """Create and return an empty staged folder beside ``final``, to publish with ``publish_dir``."""
    tmp = staging_path(final)
    os.mkdir(tmp)
    os.chmod(tmp, _DIR_MODE)
    return tmp


COMMIT_FILE = "zarr.json"
"""The file of a published folder that is uploaded last to an object store: readers trust it."""


def _publish_dir_to_url(staged: str, final: str, replace: bool) -> bool:
    try:
        if storage.exists(storage.join(final, COMMIT_FILE)):
            if not replace:
                return False
            storage.remove_tree(final)
        files = [os.path.relpath(os.path.join(d, n), staged) for d, _, names in os.walk(staged) for n in names]
        # Deepest first, the root's commit file last: a reader that sees it sees everything.
        for rel in sorted(files, key=lambda r: (r == COMMIT_FILE, -r.count(os.sep), r)):
            storage.put_file(os.path.join(staged, rel), storage.join(final, *rel.split(os.sep)))
        return True
    finally:
        shutil.rmtree(os.path.dirname(staged), ignore_errors=True)  # the local folder staging_path made


def publish_dir(staged: str, final: str, *, replace: bool = False) -> bool:
    """Make a staged folder durable and rename it to ``final``; returns whether this call published it.

    When ``final`` already exists it is kept and ``staged`` is removed (another attempt at the same
    work finished first), unless ``replace`` is set, in which case the old folder is removed first.
    A rename onto a non-empty folder fails on POSIX, so a race between two writers keeps the first.
    On an object store, two writers racing may both upload; their bytes are the same work's.
    """
    if storage.is_url(final):
        return _publish_dir_to_url(staged, final, replace)
    fsync_tree(staged)
    if os.path.exists(final):
        if not replace:
            shutil.rmtree(staged, ignore_errors=True)
            return False
        shutil.rmtree(final)
    try:
        os.rename(staged, final)  # os.rename, not replace: it refuses a non-empty target
    except OSError:
        if not os.path.exists(final):
            raise
        shutil.rmtree(staged, ignore_errors=True)
        return False
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return True


def remove_stale_staging(directory: str) -> int:
    """Delete the staged files and folders that dead writers left in ``directory``; returns how many.

    Call only while no writer is staging into ``directory``. Nothing is staged in an object store.
    """
    if storage.is_url(directory) or not os.path.isdir(directory):
        return 0
    stale = [name for name in os.listdir(directory) if is_staging_name(name)]
    for name in stale:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return len(stale)
