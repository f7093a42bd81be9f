"""A task's samples in the compact form trainers read: ``SEL/tasks/TASK/samples.zarr``, its one home.

``manifest.jsonl`` is for people and other tools; a trainer's rank must not parse 10^8 JSON rows
to find the few shards it reads. This group holds the same samples as arrays, sorted by shared
shard and, within a shard, by key, so one shard's rows are one contiguous slice::

    samples.zarr/
      zarr.json   attrs: kind="sept-task-samples", task, rows, shards (the sorted names of the
                  shared shards the task uses: a shard's index is its place here)
      offsets     (S+1,) int64: the rows of shard s are rows offsets[s]:offsets[s+1] (CSR)
      key         (n, K) uint8: each sample's key in its shared shard, UTF-8, zero-padded to K bytes
      id          (n,) int64: its pool id

Keys are stored, not derived: a shared shard holds the pool's samples byte for byte
(``sept.data.shard_copy``), under the pool's own keys, which no id or position determines. A key
is unique within a shared shard and survives DetCon's masked copies; a position need not.

A reader opens the attributes and ``offsets`` (a few bytes per shard), then reads only the slices
of the shards it is given (a chunk or two each, through ``sept.storage`` for a URL). The group is
staged and published whole (``sept.io.publish_dir``), its ``zarr.json`` last on an object store.
A selection written before this file existed has ``manifest.jsonl`` only: ``from_manifest_rows``
builds the same arrays from its rows, in memory.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import zarr

from sept import storage
from sept.errors import SeptError
from sept.io import publish_dir, staging_dir

SAMPLES_GROUP = "samples.zarr"
KIND = "sept-task-samples"
CHUNK_ROWS = 1 << 14
"""Rows per chunk: a shared shard holds at most 10,000 samples, so one shard's slice is a chunk or two."""
_CACHED_SHARDS = 16
"""Shards whose rows a reader keeps: a batch's samples come from a handful of shards at a time."""


def pack_keys(keys: Sequence[str]) -> np.ndarray:
    """(n, K) uint8: the keys' UTF-8 bytes, zero-padded to the longest (tar names hold no NUL)."""
    encoded = [k.encode() for k in keys]
    return pack_key_bytes(b"".join(encoded), np.fromiter((len(b) for b in encoded), np.int64, len(encoded)))


def pack_key_bytes(blob: bytes, lengths: np.ndarray) -> np.ndarray:
    """``pack_keys`` of keys given as their UTF-8 bytes end to end and each one's length."""
    lengths = np.asarray(lengths, np.int64)
    width = max(1, int(lengths.max(initial=0)))
    out = np.zeros((len(lengths), width), np.uint8)
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    out[rows, cols] = np.frombuffer(blob, np.uint8)
    return out


def _as_bytes(packed: np.ndarray) -> np.ndarray:
    """(n,) fixed-width bytes of packed keys: numpy compares and sorts them as Python compares bytes."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    return packed.view(f"S{packed.shape[1]}").reshape(len(packed))


def sort_samples(shard_names: Sequence[str], shard_of: np.ndarray, keys: np.ndarray, ids: np.ndarray, where: str):
    """Rows sorted by (shard, key): (offsets, keys, ids). ``shard_of`` indexes ``shard_names``
    (sorted); a key twice in one shard is a ``SeptError`` naming ``where``."""
    shard_of = np.asarray(shard_of, np.int64)
    order = np.lexsort((_as_bytes(keys), shard_of))
    shard_of, keys, ids = shard_of[order], keys[order], np.asarray(ids, np.int64)[order]
    as_bytes = _as_bytes(keys)
    twice = np.flatnonzero((shard_of[1:] == shard_of[:-1]) & (as_bytes[1:] == as_bytes[:-1]))
    if len(twice):
        i = int(twice[0])
        raise SeptError(f"{where}: key {as_bytes[i].decode()!r} appears twice in shard {shard_names[shard_of[i]]}")
    offsets = np.searchsorted(shard_of, np.arange(len(shard_names) + 1)).astype(np.int64)
    return offsets, keys, ids


def write_task_samples(
    task_folder: str, task: str, shard_names: Sequence[str], shard_of: np.ndarray, keys: np.ndarray, ids: np.ndarray
) -> str:
    """Publish ``task_folder/samples.zarr`` from rows in any order (``keys`` packed by ``pack_keys``,
    ``shard_of`` indexing the sorted ``shard_names``), replacing an older one; returns its path.

    A group that already holds these rows is left as it is: ``sept select`` rewrites every task's
    files when it adds one, and a trainer may be reading this group slice by slice meanwhile.
    """
    final = storage.join(task_folder, SAMPLES_GROUP)
    offsets, keys, ids = sort_samples(shard_names, shard_of, keys, ids, final)
    if _holds(task_folder, shard_names, offsets, keys, ids):
        return final
    tmp = staging_dir(final)
    group = zarr.open_group(tmp, mode="w")
    n = len(ids)
    rows = max(1, min(n, CHUNK_ROWS))
    group.create_array("offsets", shape=offsets.shape, dtype="int64", chunks=(max(1, len(offsets)),))[...] = offsets
    group.create_array("key", shape=keys.shape, dtype="uint8", chunks=(rows, keys.shape[1]))[...] = keys
    group.create_array("id", shape=(n,), dtype="int64", chunks=(rows,))[...] = ids
    group.attrs.update(kind=KIND, task=task, rows=n, shards=list(shard_names))
    publish_dir(tmp, final, replace=True)
    return final


def _holds(task_folder: str, shard_names: Sequence[str], offsets: np.ndarray, keys: np.ndarray, ids: np.ndarray):
    """Whether the published group of ``task_folder`` holds exactly these sorted rows."""
    if not has_task_samples(task_folder):
        return False
    try:
        old = TaskSamples.open(task_folder)
        arrays = old._open()
        return (
            old.shards == list(shard_names)
            and np.array_equal(old.offsets, offsets)
            and np.array_equal(np.asarray(arrays["key"][...]), keys)
            and np.array_equal(np.asarray(arrays["id"][...]), ids)
        )
    except SeptError:
        return False  # a damaged group is replaced


def has_task_samples(task_folder: str) -> bool:
    return storage.exists(storage.join(task_folder, SAMPLES_GROUP, "zarr.json"))


class TaskSamples(Sequence[frozenset[str]]):
    """One task's samples by shared shard: names and counts up front, one shard's keys and pool ids
    read when asked. ``samples[s]`` is the keys of shard ``s``: what a trainer keeps of that shard.

    The arrays are a Zarr group's (read slice by slice) or in-memory numpy arrays (a legacy
    manifest's); a reader forked into another process (a loading worker) reopens the group there.
    """

    def __init__(self, shards: Sequence[str], offsets: np.ndarray, *, path: str | None = None, arrays=None):
        self.shards = list(shards)
        """The shared shards' file names, sorted: shard ``s`` is ``shards[s]``."""
        self.offsets = np.asarray(offsets, np.int64)
        self.path = path
        self._arrays = arrays
        self._opened_in = os.getpid() if arrays is not None else None
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @classmethod
    def open(cls, task_folder: str) -> TaskSamples:
        """The task's ``samples.zarr``: its attributes and offsets read, its rows left on disk."""
        path = storage.join(task_folder, SAMPLES_GROUP)
        try:
            group = zarr.open_group(storage.zarr_store(path, read_only=True), mode="r")
            attrs = dict(group.attrs)
            offsets = np.asarray(group["offsets"][...], np.int64)
            shapes = group["key"].shape[0], group["id"].shape[0]
        except (KeyError, ValueError, OSError) as err:
            raise SeptError(f"{path} is not a readable task samples group ({err}); rerun `sept select`") from None
        if attrs.get("kind") != KIND:
            raise SeptError(f"{path} is not a sept task samples group (kind {attrs.get('kind')!r})")
        shards = list(attrs.get("shards", []))
        rows = int(attrs.get("rows", -1))
        if (
            len(offsets) != len(shards) + 1
            or offsets[0] != 0
            or np.any(np.diff(offsets) < 0)
            or not offsets[-1] == rows == shapes[0] == shapes[1]
        ):
            raise SeptError(f"{path} is damaged: its offsets, shards and rows disagree; rerun `sept select`")
        return cls(shards, offsets, path=path)

    @classmethod
    def from_manifest_rows(cls, rows: Sequence[dict], where: str) -> TaskSamples:
        """The same arrays from a manifest's rows (``shard``, ``key``, ``id``), held in memory."""
        names = sorted({r["shard"] for r in rows})
        index = {name: i for i, name in enumerate(names)}
        shard_of = np.fromiter((index[r["shard"]] for r in rows), np.int64, len(rows))
        ids = np.fromiter((int(r["id"]) for r in rows), np.int64, len(rows))
        offsets, keys, ids = sort_samples(names, shard_of, pack_keys([r["key"] for r in rows]), ids, where)
        return cls(names, offsets, arrays=dict(key=keys, id=ids))

    def __getstate__(self):
        state = dict(self.__dict__, _cache=OrderedDict())
        if self.path is not None:
            state.update(_arrays=None, _opened_in=None)  # reopened where it is unpickled
        return state

    @property
    def counts(self) -> np.ndarray:
        """Samples per shard."""
        return np.diff(self.offsets)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, s):
        if isinstance(s, slice):
            return [self[i] for i in range(*s.indices(len(self)))]
        keys, _ = self.rows(s)
        return frozenset(k.decode() for k in keys.tolist())

    def rows(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``s``'s keys (fixed-width bytes, ascending) and pool ids: one slice of each array."""
        s = int(s)
        if not 0 <= s < len(self.shards):
            raise IndexError(f"shard index {s} outside the task's {len(self.shards)} shards")
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        arrays = self._open()
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        found = _as_bytes(np.asarray(arrays["key"][lo:hi])), np.asarray(arrays["id"][lo:hi], np.int64)
        self._cache[s] = found
        if len(self._cache) > _CACHED_SHARDS:
            self._cache.popitem(last=False)
        return found

    def pool_ids(self, shard_index: np.ndarray, keys: Sequence[str]) -> np.ndarray:
        """int64 pool ids of the samples (shard index in ``shards``, key): a binary search in each
        shard's sorted keys. A sample the task does not hold is a ``SeptError``."""
        shard_index = np.asarray(shard_index, np.int64)
        wanted = [k.encode() for k in keys]
        out = np.empty(len(shard_index), np.int64)
        for s in np.unique(shard_index).tolist():
            mine = np.flatnonzero(shard_index == s)
            sorted_keys, ids = self.rows(s)
            asked = [wanted[i] for i in mine.tolist()]
            # A key longer than the stored width is cut by the cast below; it cannot be the task's.
            fits = np.fromiter((len(b) <= sorted_keys.dtype.itemsize for b in asked), bool, len(asked))
            asked_keys = np.asarray(asked, dtype=sorted_keys.dtype)
            at = np.minimum(np.searchsorted(sorted_keys, asked_keys), len(sorted_keys) - 1)
            hit = fits & (sorted_keys[at] == asked_keys)
            if not hit.all():
                miss = asked[int(np.flatnonzero(~hit)[0])].decode()
                raise SeptError(f"sample {miss!r} of shard {self.shards[s]} is not among the task's samples")
            out[mine] = ids[at]
        return out

    def _open(self):
        if self._arrays is None or self._opened_in != os.getpid():
            group = zarr.open_group(storage.zarr_store(self.path, read_only=True), mode="r")
            self._arrays = dict(key=group["key"], id=group["id"])
            self._opened_in = os.getpid()
        return self._arrays
