"""Reading raw pool samples: streams one WebDataset tar and groups its members into samples.

A sample is the run of adjacent tar members sharing a key (img2dataset/webdataset naming:
``dir/KEY.ext``, the key ends at the first dot of the base name). Bytes are returned exactly as
stored; decoding belongs to ``sept.data.decode``. Shard-level damage (truncation) goes through
the same skip-and-count record (``ShardStats``) that per-sample decode errors use.
"""

from __future__ import annotations

import logging
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from sept import storage
from sept.errors import SeptError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Member extensions that hold the sample's image, in order of preference."""


@dataclass
class PoolSample:
    """One sample: its key, its order within the tar, and its members' exact bytes by extension."""

    key: str
    position: int
    members: dict[str, bytes]


@dataclass
class ShardStats:
    """Skip-and-count record for one shard (or, merged, for many): what was read and what was skipped."""

    samples: int = 0
    """Complete samples read from the tar."""
    bad: int = 0
    """Samples skipped: undecodable, no image, or lost to a truncated tar."""
    bad_samples: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) for each skipped sample."""
    truncated: bool = False
    """The tar ended before its end-of-archive marker; samples after the damage are lost."""

    def add_bad(self, key: str, reason: str) -> None:
        self.bad += 1
        self.bad_samples.append((key, reason))

    def merge(self, other: ShardStats) -> None:
        """Adds ``other``'s counts to this record (to total stats over many shards)."""
        self.samples += other.samples
        self.bad += other.bad
        self.bad_samples.extend(other.bad_samples)
        self.truncated = self.truncated or other.truncated


class TruncatedShard(SeptError):
    """The tar ends (or is corrupt) before its end-of-archive marker."""

    def __init__(self, shard: str, samples_read: int, reason: str):
        super().__init__(f"truncated pool shard {shard} after {samples_read} complete samples: {reason}")
        self.shard = shard
        self.samples_read = samples_read
        self.reason = reason


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped: it ends silently on a missing or garbled header after the
    first member, which would hide a truncated shard behind a clean-looking end of iteration."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.sept_header_error = err
            raise


# Errors that mean the byte stream itself is damaged (short read, bad compression, I/O failure).
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def iter_samples(path: str, stats: ShardStats | None = None) -> Iterator[PoolSample]:
    """Streams the samples of the tar at ``path`` in order, with positions 0, 1, 2, ...

    Raises ``SeptError`` if the tar is missing or unreadable, is not a tar, or holds one key in
    non-adjacent members (never merged silently). If the tar is truncated or corrupt, the complete
    samples before the damage are yielded (the sample being read is dropped, as it may be
    incomplete); then, with ``stats`` given, the loss is recorded there (``truncated`` and one bad
    entry), otherwise ``TruncatedShard`` is raised.
    """
    try:
        raw = storage.open_file(path, "rb")
    except FileNotFoundError:
        raise SeptError(f"pool shard not found: {path}") from None
    except OSError as err:
        raise SeptError(f"pool shard not readable: {path}: {err.strerror or err}") from None
    with raw:
        yield from _iter_open_tar(raw, path, stats)


def _iter_open_tar(raw, path: str, stats: ShardStats | None) -> Iterator[PoolSample]:
    try:
        tar = tarfile.open(fileobj=raw, mode="r|*", tarinfo=_EndRecordingTarInfo)
    except _STREAM_ERRORS as err:
        if not _truncated_at_open(err, raw):
            raise SeptError(f"pool shard is not a tar archive: {path} ({err})") from None
        tar, damage = None, f"{type(err).__name__}: {err}"

    position = 0
    pending: PoolSample | None = None
    if tar is not None:
        finished_keys: set[str] = set()
        try:
            while (info := tar.next()) is not None:
                tar.members = []  # streaming: tarfile would otherwise keep every header in memory
                if not info.isfile():
                    continue
                key, ext = _split_member_name(info.name)
                if key is None:
                    log.debug("%s: skipping member %r, not named KEY.EXT", path, info.name)
                    continue
                if pending is None or key != pending.key:
                    if key in finished_keys:
                        raise SeptError(f"pool shard {path}: members of key {key!r} are not adjacent in the tar")
                    # A new key's intact header proves the previous sample is complete.
                    if pending is not None:
                        finished_keys.add(pending.key)
                        yield _counted(pending, stats)
                        position += 1
                    pending = PoolSample(key=key, position=position, members={})
                elif ext in pending.members:
                    raise SeptError(f"pool shard {path}: key {key!r} has two {ext!r} members")
                pending.members[ext] = tar.extractfile(info).read()
            damage = _damage_from_end(getattr(tar, "sept_header_error", None))
        except _STREAM_ERRORS as err:
            damage = f"{type(err).__name__}: {err}"
        finally:
            tar.close()

    if damage is None:
        if pending is not None:
            yield _counted(pending, stats)
        return
    if stats is None:
        raise TruncatedShard(path, position, damage)
    log.warning("truncated pool shard %s after %d complete samples: %s", path, position, damage)
    stats.truncated = True
    stats.add_bad(pending.key if pending is not None else "", f"truncated shard: {damage}")


def _counted(sample: PoolSample, stats: ShardStats | None) -> PoolSample:
    if stats is not None:
        stats.samples += 1
    return sample


def _damage_from_end(end: Exception | None) -> str | None:
    """None if tarfile stopped at an end-of-archive block; else why the tar ended early."""
    if end is None or isinstance(end, tarfile.EOFHeaderError):
        return None
    if isinstance(end, tarfile.EmptyHeaderError):
        return "no end-of-archive marker"
    if isinstance(end, tarfile.TruncatedHeaderError):
        return "truncated member header"
    return f"corrupt member header ({end})"


def _truncated_at_open(err: Exception, raw) -> bool:
    """Whether tarfile failed on the first header because the file ends there (not another format)."""
    if "empty file" in str(err) or "truncated header" in str(err):
        return True
    size = getattr(raw, "size", None)  # an fsspec file knows its size; it has no descriptor
    try:
        size = os.fstat(raw.fileno()).st_size if size is None else size
    except OSError:
        return False
    return size < tarfile.BLOCKSIZE


def _split_member_name(name: str) -> tuple[str | None, str]:
    """(key, lowercased extension) for ``dir/KEY.ext.more``; (None, "") for a name without both."""
    while name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None, ""
    stem, _, ext = base.partition(".")
    if not ext:
        return None, ""
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def image_member(sample: PoolSample) -> tuple[str, bytes] | None:
    """(extension, bytes) of the sample's image member, preferring ``IMAGE_EXTS`` order; None if none."""
    for ext in IMAGE_EXTS:
        data = sample.members.get(ext)
        if data is not None:
            return ext, data
    return None


def image_bytes(sample: PoolSample) -> bytes | None:
    """The bytes of the sample's image member (first in ``IMAGE_EXTS`` order), or None."""
    found = image_member(sample)
    return None if found is None else found[1]
