"""Byte-exact materialization of selected pool samples into new WebDataset shards.

``extract_samples`` reads one source shard once and yields the selected samples unchanged;
``SelectionShardWriter`` writes them, member bytes untouched, into numbered output shards. A shard
is written under a ``.tmp`` name, read back and compared digest by digest, then renamed into
place, so an output folder only ever holds complete, verified ``.tar`` files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import closing

import webdataset as wds

from sept.data.samples import PoolSample, iter_samples
from sept.errors import SeptError
from sept.io import fsync_dir, staging_path

log = logging.getLogger(__name__)

_TAR_MTIME = 0.0  # fixed member times: the same selection gives byte-identical shards


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
    and only then renamed from its ``.tmp`` name. On an exception inside ``with``, the unfinished
    shard is deleted; finished shards stay (``shards`` lists them).
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
        self.shards: list[str] = []
        """Finished (verified, renamed) shard paths, in order."""
        self.samples_written = 0
        self._next_index = start_index
        self._file = None
        self._tar: wds.TarWriter | None = None
        self._name = ""
        self._count = 0
        self._size = 0
        self._keys: set[str] = set()
        self._digests: list[tuple[str, dict[str, str]]] = []
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
        if self._tar is not None and (
            self._count >= self.maxcount or (self.maxsize is not None and self._size >= self.maxsize)
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        if key in self._keys:
            # Two samples with one key in a shard would be read back as one merged sample.
            raise ValueError(f"key {key!r} already written to shard {self._name}; pass a unique key")
        record = {"__key__": key, **sample.members}
        self._tar.write(record)
        self._keys.add(key)
        self._digests.append((key, _digests(sample.members)))
        self._count += 1
        self._size += sum(len(v) for v in sample.members.values())
        self.samples_written += 1
        return self._name

    def close(self) -> None:
        """Finishes the current shard (if it holds any sample)."""
        if self._tar is not None:
            self._finish_shard()

    def abort(self) -> None:
        """Drops the unfinished shard; finished shards are kept."""
        if self._tar is None:
            return
        tmp = self._tmp_path()
        try:
            self._tar.close()
            self._file.close()
        finally:
            self._reset()
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self) -> SelectionShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _tmp_path(self) -> str:
        return self._staged

    def _open_shard(self) -> None:
        self._name = self.shard_name(self._next_index)
        self._next_index += 1
        self._staged = staging_path(os.path.join(self.out_dir, self._name))
        self._file = open(self._staged, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)

    def _finish_shard(self) -> None:
        tmp, final = self._tmp_path(), os.path.join(self.out_dir, self._name)
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.verify:
                _verify_shard(tmp, self._digests)
        except BaseException:
            self._reset()
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, final)
        fsync_dir(self.out_dir)
        log.debug("wrote %s (%d samples)", final, self._count)
        self.shards.append(final)
        self._reset()

    def _reset(self) -> None:
        self._tar = None
        self._file = None
        self._count = 0
        self._size = 0
        self._keys = set()
        self._digests = []


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
