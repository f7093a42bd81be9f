"""The one part-file writer: selected pool samples, byte-exact, into numbered WebDataset shards.

``extract_samples`` reads one source shard once and yields the selected samples unchanged.
``SelectionShardWriter`` appends samples, member bytes untouched, to numbered parts: either a
``PoolSample`` (``write``: tar headers made here, fixed times and owners so the same samples give
the same bytes) or a sample's raw tar records copied from its source shard (``write_records``,
``sept.data.tar_scan``: every header and byte as in the pool). A part is written under a staging
name and hashed as it is written; on close it is read back (its bytes, and with ``verify`` the
samples written with ``write``), then renamed into place, so a folder only ever holds complete,
verified ``.tar`` files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import closing

from sept.data.samples import PoolSample, iter_samples
from sept.data.tar_scan import BLOCK, END_OF_ARCHIVE, RECORD, SampleSpan, copy_records
from sept.errors import SeptError
from sept.io import file_digest, fsync_dir, staging_path

log = logging.getLogger(__name__)


class ShardVerificationError(RuntimeError):
    """A written shard did not read back with the bytes that were written (disk or library fault)."""


def extract_samples(shard_path: str, positions: Iterable[int]) -> Iterator[PoolSample]:
    """The samples at ``positions`` of one pool shard, in tar order, exactly as stored.

    Reads the shard once and stops after the last wanted position. Raises ``SeptError`` if the
    shard has no sample at some wanted position (it is shorter or truncated: it changed since
    the ids were made).
    """
    wanted = set(int(p) for p in positions)
    if not wanted:
        return
    if min(wanted) < 0:
        raise ValueError(f"positions must be non-negative, got {min(wanted)}")
    last = max(wanted)
    found = 0
    with closing(iter_samples(shard_path)) as samples:
        for sample in samples:
            if sample.position in wanted:
                found += 1
                yield sample
            if sample.position >= last:
                break
    if found < len(wanted):
        raise SeptError(
            f"pool shard {shard_path} has no sample at {len(wanted) - found} selected positions"
            f" (last wanted {last}); the shard changed since its samples were indexed"
        )


class SelectionShardWriter:
    """Writes samples into ``{prefix}-{n:06d}.tar`` shards in ``out_dir``, each member's bytes unchanged.

    A shard is closed after ``maxcount`` samples (or once it holds ``maxsize`` bytes), verified,
    and only then renamed from its staging name. Two samples with one key cannot share a tar (they
    would read back as one): with ``new_part_on_repeated_key`` the second starts a new shard,
    otherwise it is a ``ValueError``. On an exception inside ``with``, the unfinished shard is
    deleted; finished shards stay (``shards`` lists them, ``parts`` with their size and sha256).
    """

    def __init__(
        self,
        out_dir: str,
        prefix: str = "selected",
        maxcount: int = 1000,
        *,
        maxsize: int | None = None,
        start_index: int = 0,
        verify: bool = True,
        new_part_on_repeated_key: bool = False,
    ):
        if maxcount < 1:
            raise ValueError(f"maxcount must be at least 1, got {maxcount}")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
        self.out_dir = os.path.abspath(out_dir)
        self.prefix = prefix
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.verify = verify
        self.new_part_on_repeated_key = new_part_on_repeated_key
        self.shards: list[str] = []
        """Finished (verified, renamed) shard paths, in order."""
        self.parts: list[tuple[str, int, str]] = []
        """Finished shards as (path, size, sha256), in order."""
        self.samples_written = 0
        self._next_index = start_index
        self._file = None
        self._name = ""
        self._reset()
        os.makedirs(self.out_dir, exist_ok=True)

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def write(self, sample: PoolSample, key: str | None = None) -> str:
        """Writes ``sample`` (under ``key`` if given, else its own key); returns its shard's file name."""
        key = sample.key if key is None else key
        _check_key(key)
        for ext in sample.members:
            if not ext or ext.startswith("_") or "/" in ext:
                raise SeptError(f"sample {sample.key!r} has a member extension tar cannot keep: {ext!r}")
        self._start_sample(key)
        for ext, data in sample.members.items():
            self._append(_member_header(f"{key}.{ext}", len(data)))
            self._append(data)
            self._append(bytes(-len(data) % BLOCK))
        self._digests.append((key, _digests(sample.members)))
        return self._end_sample(key, sum(len(v) for v in sample.members.values()))

    def write_records(self, source, span: SampleSpan) -> str:
        """Appends one sample's raw tar records from ``source`` (a ``tar_scan`` buffer); returns its shard's name."""
        self._start_sample(span.key)
        before = self._size
        self._size += copy_records(source, span, self._file, self._hash)
        self._raw = True
        return self._end_sample(span.key, self._size - before)

    def close(self) -> None:
        """Finishes the current shard (if it holds any sample)."""
        if self._file is not None:
            self._finish_shard()

    def abort(self) -> None:
        """Drops the unfinished shard; finished shards are kept."""
        if self._file is None:
            return
        try:
            self._file.close()
        finally:
            staged = self._staged
            self._reset()
            if os.path.exists(staged):
                os.remove(staged)

    def __enter__(self) -> SelectionShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start_sample(self, key: str) -> None:
        if self._file is not None and (
            self._count >= self.maxcount
            or (self.maxsize is not None and self._payload >= self.maxsize)
            or (self.new_part_on_repeated_key and key in self._keys)
        ):
            self._finish_shard()
        if self._file is None:
            self._open_shard()
        if key in self._keys:
            # Two samples with one key in a shard would be read back as one merged sample.
            raise ValueError(f"key {key!r} already written to shard {self._name}; pass a unique key")

    def _end_sample(self, key: str, payload: int) -> str:
        self._keys.add(key)
        self._count += 1
        self._payload += payload
        self.samples_written += 1
        return self._name

    def _append(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    def _open_shard(self) -> None:
        self._name = self.shard_name(self._next_index)
        self._next_index += 1
        self._staged = staging_path(os.path.join(self.out_dir, self._name))
        self._file = open(self._staged, "wb")
        self._hash = hashlib.sha256()

    def _finish_shard(self) -> None:
        staged, final = self._staged, os.path.join(self.out_dir, self._name)
        try:
            self._append(END_OF_ARCHIVE + bytes(-(self._size + len(END_OF_ARCHIVE)) % RECORD))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            size, sha = self._size, self._hash.hexdigest()
            if file_digest(staged) != (size, sha):
                raise ShardVerificationError(f"written shard {final} reads back differently from what was written")
            if self.verify and not self._raw:
                _verify_shard(staged, self._digests)
        except BaseException:
            self._reset()
            if os.path.exists(staged):
                os.remove(staged)
            raise
        os.replace(staged, final)
        fsync_dir(self.out_dir)
        log.debug("wrote %s (%d samples)", final, self._count)
        self.shards.append(final)
        self.parts.append((final, size, sha))
        self._reset()

    def _reset(self) -> None:
        self._file = None
        self._hash = None
        self._count = 0
        self._size = 0  # bytes in the file
        self._payload = 0  # member bytes, what maxsize counts
        self._raw = False  # a sample was copied as raw records: nothing to compare member digests with
        self._keys: set[str] = set()
        self._digests: list[tuple[str, dict[str, str]]] = []


def _member_header(name: str, size: int) -> bytes:
    """A tar header for a member; fixed time, mode and owner, so the same sample gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "bigdata"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _check_key(key: str) -> None:
    base = key.rpartition("/")[2]
    if not base or "." in base or key.startswith("/"):
        # The reader ends a key at the first dot of the base name; such a key would not round-trip.
        raise ValueError(f"key {key!r} cannot name tar members: it must be non-empty, without dots")


def _digests(members: dict[str, bytes]) -> dict[str, str]:
    return {ext: hashlib.blake2b(data, digest_size=16).hexdigest() for ext, data in members.items()}


def _verify_shard(path: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    """Reads ``path`` back and checks every sample's keys and member digests against ``expected``."""
    try:
        got = [(s.key, _digests(s.members)) for s in iter_samples(path)]
    except SeptError as err:
        raise ShardVerificationError(f"written shard {path} does not read back: {err}") from None
    if got != expected:
        bad = next(
            (i for i, (g, e) in enumerate(zip(got, expected)) if g != e),
            min(len(got), len(expected)),
        )
        raise ShardVerificationError(
            f"written shard {path} reads back differently from sample {bad}"
            f" ({len(got)} samples read, {len(expected)} written)"
        )
