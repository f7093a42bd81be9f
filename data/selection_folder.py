"""The selection folder's one home: its layout, its files written atomically, the claims that keep two
runs from mixing, the shard catalog that marks copy jobs done, and the one-writer lock.

Layout::

    SEL/selection.json              what every task here shares: the index and the encoder
    SEL/.lock                       held by the one process writing to SEL
    SEL/shards/part-JOB-NNNNNN.tar  the shared shards, each sample copied once (``sept.data.shard_copy``)
    SEL/shards/.catalog/JOB.json    a copy job's done-marker: its rows and every part's size and sha256
    SEL/shards/.lock                held by the one process copying into SEL/shards
    SEL/masks/part-JOB-NNNNNN.tar   DetCon's segmentation masks: each shared shard with a mask per sample,
                                    made by the first DetCon run over it (``sept.training.run_data``)
    SEL/tasks/TASK/task.json        the task's resolved config, and its summary once chosen
    SEL/tasks/TASK/choice.jsonl     its chosen samples: id, score, who chose and who retrieved each
    SEL/tasks/TASK/queries.jsonl    per target image: its class and its best chosen neighbours
    SEL/tasks/TASK/leakage.jsonl    pool samples excluded as too close to a held-out image, and to which
    SEL/tasks/TASK/manifest.jsonl   the choice joined with where each sample sits in the shards: for people
                                    and other tools (its presence lists the task, so it is written last)
    SEL/tasks/TASK/samples.zarr/    what trainers read: the same samples as arrays sorted by shared shard,
                                    then key, one shard's rows a slice (``sept.data.task_samples``)
    SEL/tasks/TASK/shards.json      size and sha256 of every shared shard the task uses
    SEL/tasks/curated/clusters.npz  `sept curate`'s tree (``sept.cluster.curate``): centroids and parents per
                                    level, top-level sizes in the pool and the sample, each sample's clusters

The folder may be an object-store URL (``s3://bucket/sel``): every file is then staged on local disk
and uploaded whole (``sept.io``), and the markers below are what readers trust there too, since a
prefix exists as soon as one object under it does.

Two markers make a run resumable: ``choice.jsonl``, written last when a task is chosen, lets an
interrupted run skip its search; a job's catalog file, moved into place after its parts, lets it
skip the copy. Parts no catalog file names were left by a crash and are removed before new work
(``discard_unfinished``). Read together, the done-markers are the ``Catalog``: every copied
sample as columns sorted by pool id, so a selection of 10^8 samples is joined in one process. Every file is JSON with sorted keys, and ``samples.zarr`` is a function
of the manifest's rows, so a rerun of the same command reproduces every byte.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from sept import storage
from sept.data.task_samples import pack_key_bytes, write_task_samples
from sept.errors import SeptError
from sept.io import atomic_file, atomic_write_text, is_staging_name

log = logging.getLogger(__name__)

TASKS_DIR = "tasks"
SHARDS_DIR = "shards"
MASKS_DIR = "masks"
CATALOG = ".catalog"
LOCK_FILE = ".lock"
PART_PREFIX = "part-"
MANIFEST = "manifest.jsonl"
SHARDS_FILE = "shards.json"

SELECTION_FILE = "selection.json"
TASK_FILE = "task.json"
CHOICE_FILE = "choice.jsonl"
QUERIES_FILE = "queries.jsonl"
LEAKAGE_FILE = "leakage.jsonl"
KIND = "sept-selection"


def task_dir(selection_dir: str, task: str) -> str:
    return storage.join(storage.resolve(selection_dir), TASKS_DIR, task)


def shards_dir(selection_dir: str) -> str:
    return storage.join(storage.resolve(selection_dir), SHARDS_DIR)


def is_selection_dir(path: str) -> bool:
    """Whether ``path`` is a selection folder (``SEL`` with ``SEL/tasks/``), not a task or shards."""
    return storage.isdir(storage.join(path, TASKS_DIR)) and storage.isdir(storage.join(path, SHARDS_DIR))


def list_tasks(selection_dir: str) -> list[str]:
    """Tasks with a manifest in the selection, sorted by name."""
    root = storage.join(storage.resolve(selection_dir), TASKS_DIR)
    return sorted(t for t in storage.listdir(root) if storage.isfile(storage.join(root, t, MANIFEST)))


def read_manifest(selection_dir: str, task: str) -> list[dict]:
    path = storage.join(task_dir(selection_dir, task), MANIFEST)
    if not storage.isfile(path):
        known = list_tasks(selection_dir)
        raise SeptError(f"no manifest for task {task!r} in {selection_dir} (tasks there: {', '.join(known) or 'none'})")
    return read_jsonl(path)


def write_json(path: str, obj) -> None:
    _write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """One JSON object a line, written row by row to the staged file: the rows may be a generator."""
    with atomic_file(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def read_json(path: str):
    with storage.open_file(path, "r") as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str) -> Iterator[dict]:
    """The rows of a JSONL file, one at a time."""
    with storage.open_file(path, "r") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _write_atomic(path: str, text: str) -> None:
    atomic_write_text(path, text)


def claim_selection(out: str, shared: dict, out_as_given: str) -> None:
    """Make ``out`` a selection folder for this index and encoder, or check that it already is one."""
    record = storage.join(out, SELECTION_FILE)
    if storage.exists(record):
        old = read_json(record)
        if old.get("kind") != KIND or old.get("shared") != shared:
            changed = sorted(k for k in shared if (old.get("shared") or {}).get(k) != shared[k])
            raise SeptError(
                f"{out_as_given} holds a selection from another index or encoder (differs in "
                f"{', '.join(changed) or 'kind'}); choose another --out"
            )
        return
    if [n for n in storage.listdir(out) if n != LOCK_FILE]:
        raise SeptError(f"{out_as_given} exists and does not hold a sept selection; choose another --out")
    write_json(record, dict(kind=KIND, shared=shared))


def claim_task(out: str, name: str, config: dict, out_as_given: str) -> None:
    """Record a task's config; the same task with another config is refused, never overwritten."""
    path = storage.join(task_dir(out, name), TASK_FILE)
    if storage.exists(path):
        old = read_json(path).get("config", {})
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise SeptError(
                f"{out_as_given} already holds task {name!r} selected differently (differs in "
                f"{', '.join(changed)}); choose another --out or --task name"
            )
        return
    write_json(path, dict(config=config, summary=None))


def task_is_chosen(out: str, name: str) -> bool:
    return storage.exists(storage.join(task_dir(out, name), CHOICE_FILE))


def tasks_in(out: str) -> list[str]:
    """Every task of the selection folder that has been chosen, sorted."""
    return sorted(t for t in storage.listdir(storage.join(out, TASKS_DIR)) if task_is_chosen(out, t))


def union_of_choices(out: str, exclude: set[str] = frozenset()) -> np.ndarray:
    """The pool ids chosen by every chosen task of the folder but those in ``exclude``: sorted, distinct, int64."""
    parts = [np.zeros(0, np.int64)]
    for name in tasks_in(out):
        if name not in exclude:
            parts.append(np.unique(np.fromiter(_ids_of(storage.join(task_dir(out, name), CHOICE_FILE)), np.int64)))
    return np.unique(np.concatenate(parts))


def _ids_of(path: str) -> Iterator[int]:
    with storage.open_file(path, "r") as f:
        for line in f:
            if line.strip():
                yield int(json.loads(line)["id"])


def write_task_records(
    out: str, name: str, *, queries: list[dict], leakage: list[dict], summary: dict, choice: list[dict]
) -> None:
    """Write a chosen task's files; ``choice.jsonl`` goes last, since its presence means chosen."""
    folder = task_dir(out, name)
    config = read_json(storage.join(folder, TASK_FILE))["config"]
    write_jsonl(storage.join(folder, QUERIES_FILE), queries)
    write_jsonl(storage.join(folder, LEAKAGE_FILE), leakage)
    write_json(storage.join(folder, TASK_FILE), dict(config=config, summary=summary))
    write_jsonl(storage.join(folder, CHOICE_FILE), choice)


def task_summary(out: str, name: str) -> dict | None:
    return read_json(storage.join(task_dir(out, name), TASK_FILE))["summary"]


def write_manifest(out: str, name: str, catalog: Catalog) -> None:
    """Join a task's choice with where the catalog holds each sample: its manifest, its compact
    samples group (``sept.data.task_samples``) and its shards' record.

    The choice is streamed: each manifest row is written as it is joined, and only its shard, key
    and id are kept, as arrays. ``manifest.jsonl`` is published last, since it is what lists the task.
    """
    folder = task_dir(out, name)
    codes: dict[str, int] = {}  # shared shard -> its code, in order of first use
    shard_of, ids, key_lengths = array("q"), array("q"), array("q")
    key_blob = bytearray()
    with atomic_file(storage.join(folder, MANIFEST), "w") as f:
        for row in iter_jsonl(storage.join(folder, CHOICE_FILE)):
            sample_id = int(row["id"])
            where = catalog.row(sample_id)
            joined = dict(
                row,
                key=where["key"],
                shard=where["shard"],
                source_shard=where["source_shard"],
                position=where["position"],
                sha256=where["sha256"],
            )
            f.write(json.dumps(joined, sort_keys=True) + "\n")
            shard_of.append(codes.setdefault(where["shard"], len(codes)))
            ids.append(sample_id)
            key = where["key"].encode()
            key_blob += key
            key_lengths.append(len(key))
        names = sorted(codes)
        sorted_code = np.empty(len(names), np.int64)
        for i, shard in enumerate(names):
            sorted_code[codes[shard]] = i
        write_task_samples(
            folder,
            name,
            names,
            sorted_code[np.frombuffer(shard_of, np.int64)],
            pack_key_bytes(bytes(key_blob), np.frombuffer(key_lengths, np.int64)),
            np.frombuffer(ids, np.int64),
        )
        write_json(storage.join(folder, SHARDS_FILE), {shard: catalog.parts[shard] for shard in names})


@dataclass
class Catalog:
    """What a shared shard folder holds: every copied sample as columns sorted by pool id (a few
    dozen bytes a sample, never a dict per sample: a selection of 10^8 is read by one process),
    and every part's size and hash. ``row(id)`` gives one sample's row as its copy job wrote it."""

    ids: np.ndarray  # (n,) int64 pool ids, ascending
    part: np.ndarray  # (n,) int32 into ``names``: the shared shard holding the sample
    source: np.ndarray  # (n,) int32 into ``names``: the pool shard it was copied from
    source_index: np.ndarray  # (n,) int32 that pool shard's index in the pool's listing
    position: np.ndarray  # (n,) int64 its position there
    key_end: np.ndarray  # (n,) int64: the sample's key is key_blob[key_end[i-1]:key_end[i]]
    key_blob: bytes
    sha256_end: np.ndarray  # (n,) int64: its digest (hex, as the job wrote it) the same way
    sha256_blob: bytes
    members: np.ndarray  # (n,) int32 into ``member_sets``
    names: list[str]  # shard names and paths, each once
    member_sets: list[list[str]]
    parts: dict[str, dict]
    jobs: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def has(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is in the shards."""
        ids = np.asarray(ids, np.int64)
        if not len(self.ids):
            return np.zeros(ids.shape, bool)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[at] == ids

    def row(self, sample_id: int) -> dict:
        i = int(np.searchsorted(self.ids, sample_id))
        if i == len(self.ids) or self.ids[i] != sample_id:
            raise KeyError(sample_id)
        return dict(
            id=int(sample_id),
            key=_string(self.key_blob, self.key_end, i),
            shard=self.names[self.part[i]],
            source_shard=self.names[self.source[i]],
            source_index=int(self.source_index[i]),
            position=int(self.position[i]),
            members=list(self.member_sets[self.members[i]]),
            sha256=_string(self.sha256_blob, self.sha256_end, i),
        )


def _string(blob: bytes, ends: np.ndarray, i: int) -> str:
    return blob[int(ends[i - 1]) if i else 0 : int(ends[i])].decode()


def _gather_strings(blob: bytes, ends: np.ndarray, order: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Strings stored end to end (string i is blob[ends[i-1]:ends[i]]), taken in ``order``, stored the same way."""
    if len(order) == len(ends) and (np.diff(order) == 1).all():
        return blob, ends  # the markers' rows were in id order already: nothing to move
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    lengths = (ends - starts)[order]
    new_ends = np.cumsum(lengths).astype(np.int64)
    gather = np.repeat(starts[order] - (new_ends - lengths), lengths) + np.arange(int(lengths.sum()))
    return np.frombuffer(blob, np.uint8)[gather].tobytes(), new_ends


def catalog_marker(shards: str, job: str) -> str:
    """The done-marker of copy job ``job`` in the shared shard folder ``shards``."""
    return storage.join(shards, CATALOG, f"{job}.json")


def read_catalog(shards: str) -> Catalog:
    """Every done-marker's rows, one job's at a time, into columns; a later job's row for an id wins."""
    codes: dict[str, int] = {}
    member_codes: dict[tuple[str, ...], int] = {}
    columns: dict[str, array] = {
        name: array("q") for name in ("id", "part", "source", "index", "position", "key", "sha256", "members")
    }
    key_blob, digests = bytearray(), bytearray()
    parts: dict[str, dict] = {}
    jobs = []
    folder = storage.join(shards, CATALOG)
    for name in sorted(storage.listdir(folder)):
        if not name.endswith(".json"):
            continue
        record = read_json(storage.join(folder, name))
        jobs.append(record["job"])
        parts.update(record["parts"])
        for row in record["rows"]:
            columns["id"].append(int(row["id"]))
            columns["part"].append(codes.setdefault(row["shard"], len(codes)))
            columns["source"].append(codes.setdefault(row["source_shard"], len(codes)))
            columns["index"].append(int(row["source_index"]))
            columns["position"].append(int(row["position"]))
            key_blob += row["key"].encode()
            columns["key"].append(len(key_blob))
            digests += row["sha256"].encode()
            columns["sha256"].append(len(digests))
            columns["members"].append(member_codes.setdefault(tuple(row["members"]), len(member_codes)))
    col = {name: np.frombuffer(a, np.int64) if len(a) else np.zeros(0, np.int64) for name, a in columns.items()}
    ids = col["id"]
    # Sorted by id, the last row of an id kept (as a dict filled job by job would).
    order = np.lexsort((np.arange(len(ids)), ids))
    last = np.ones(len(order), bool)
    last[:-1] = ids[order][1:] != ids[order][:-1]
    order = order[last]
    keys, key_end = _gather_strings(bytes(key_blob), col["key"], order)
    sha256, sha256_end = _gather_strings(bytes(digests), col["sha256"], order)
    return Catalog(
        ids=ids[order].copy(),
        part=col["part"][order].astype(np.int32),
        source=col["source"][order].astype(np.int32),
        source_index=col["index"][order].astype(np.int32),
        position=col["position"][order].copy(),
        key_end=key_end,
        key_blob=keys,
        sha256_end=sha256_end,
        sha256_blob=sha256,
        members=col["members"][order].astype(np.int32),
        names=list(codes),
        member_sets=[list(m) for m in member_codes],
        parts=parts,
        jobs=jobs,
    )


def _lock_path(folder: str) -> str:
    """The lock file of a folder: inside it on disk; for a URL, in this machine's temporary folder.

    An object store has no advisory locks, so for a URL only writers on the same machine are kept
    apart; one writer per selection URL across machines is the user's to arrange.
    """
    if not storage.is_url(folder):
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, LOCK_FILE)
    digest = hashlib.sha256(storage.resolve(folder).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"sept-lock-{digest}")


@contextmanager
def writer_lock(folder: str):
    """One writer per selection (or shared shard) folder at a time; a second one is refused, not queued."""
    with open(_lock_path(folder), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SeptError(f"another sept process is writing to {folder}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def discard_unfinished(shards: str) -> None:
    """Remove what a crashed copy left: job folders, parts no done-marker names; drop jobs with damaged parts."""
    for name in storage.listdir(shards):
        if is_staging_name(name):
            storage.remove_tree(storage.join(shards, name))
    catalog = read_catalog(shards)  # read after the job folders are gone: no marker can appear any more
    names = storage.listdir(shards)
    for name in names:
        if name.startswith(PART_PREFIX) and name.endswith(".tar") and name not in catalog.parts:
            log.warning("materialize: removing %s, left by an interrupted run", name)
            storage.remove(storage.join(shards, name))
    for job in catalog.jobs:
        record = read_json(catalog_marker(shards, job))
        broken = [
            p
            for p, info in record["parts"].items()
            if p not in names or storage.size(storage.join(shards, p)) != info["size"]
        ]
        if broken:
            log.warning(
                "materialize: part %s of job %s is missing or changed; copying its samples again", broken[0], job
            )
            storage.remove(catalog_marker(shards, job))
            for p in record["parts"]:
                storage.remove(storage.join(shards, p))
