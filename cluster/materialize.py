"""Materialization: copy selected pool samples, byte for byte, into shared WebDataset shards, in parallel on Ray.

The output folder is a store that grows: every sample in it was copied once, whatever number of
tasks selected it, and a later run copies only the samples it does not hold yet. Layout::

    SHARDS/part-JOB-NNNNNN.tar   the copied samples (every member, the original .json included)
    SHARDS/.catalog/JOB.json     a job's done-marker: its rows (id, key, part, source, position,
                                 sample digest) and every part's size and sha256
    SHARDS/.lock                 held by the one process writing here

A *job* is a run of consecutive source shards: one Ray task reads each of its source shards once
and writes its parts into a private temporary folder; the verified parts are renamed into place
and the done-marker is written last. A selected sample is copied as the raw bytes of its tar
records (``sept.data.tar_scan``: headers and data, so every member, the original ``.json``
included, is exactly as in the pool); a source shard the scanner does not follow is read with
``tarfile`` and rewritten by ``SelectionShardWriter`` instead. A job's name is a digest of the (source shard, position)
pairs it copies, so the same selection gives the same file names and bytes, and a rerun after a
crash redoes exactly the unfinished jobs. Parts without a marker (a crash between rename and
marker) are deleted before new work starts, so no sample is ever held twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import RayTaskError
from tqdm import tqdm

from sept.data.identity import make_ids, split_ids
from sept.errors import SeptError, first_line, task_cause
from sept.io import atomic_write_json, file_digest, is_staging_name, staging_dir

log = logging.getLogger(__name__)

CATALOG = ".catalog"
PART_PREFIX = "part-"
MAX_SAMPLES_PER_PART = 10_000
SAMPLES_PER_JOB = 2000  # a job closes once it holds this many samples (about 60 MB of web images)
SOURCES_PER_BLOCK = 16  # and never reads beyond its block of this many consecutive source shards


@dataclass(frozen=True)
class Job:
    name: str
    sources: tuple[tuple[int, tuple[int, ...]], ...]  # (source shard index, sorted positions)

    @property
    def count(self) -> int:
        return sum(len(p) for _, p in self.sources)


def plan_jobs(ids: np.ndarray) -> list[Job]:
    """Group the ids' source shards into jobs; name each by its content.

    Jobs never span a block of ``SOURCES_PER_BLOCK`` source shards, and within a block they close
    once they hold ``SAMPLES_PER_JOB`` samples. The plan depends only on the ids, never on how
    many there are in all: after a crash, the ids of an unfinished job are planned into the same
    job again, so a resumed run writes the very parts an uninterrupted one would have.
    """
    shard_idx, positions = split_ids(np.unique(np.asarray(ids, dtype=np.int64)))
    by_shard: dict[int, list[int]] = {}
    for s, p in zip(shard_idx.tolist(), positions.tolist()):
        by_shard.setdefault(s, []).append(p)
    jobs, current, count, block = [], [], 0, None
    for s in sorted(by_shard):
        if current and (count >= SAMPLES_PER_JOB or s // SOURCES_PER_BLOCK != block):
            jobs.append(_job(current))
            current, count = [], 0
        block = s // SOURCES_PER_BLOCK
        current.append((s, tuple(sorted(by_shard[s]))))
        count += len(by_shard[s])
    if current:
        jobs.append(_job(current))
    return jobs


def _job(sources: list[tuple[int, tuple[int, ...]]]) -> Job:
    h = hashlib.sha256()
    for s, ps in sources:
        h.update(f"{s}:{','.join(map(str, ps))};".encode())
    return Job(name=f"{sources[0][0]:05d}-{h.hexdigest()[:12]}", sources=tuple(sources))


def sample_digest(members: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for ext in sorted(members):
        digest.update(ext.encode())
        digest.update(members[ext])
    return digest.hexdigest()[:16]


@ray.remote(num_cpus=1, max_retries=2)
def materialize_job(job: Job, pool: dict[int, str], out_dir: str, max_per_part: int = MAX_SAMPLES_PER_PART) -> dict:
    """Copy one job's samples into parts, rename them into ``out_dir``, write its done-marker; return the marker."""
    from sept.data.tar_scan import UnsupportedTar

    marker = os.path.join(out_dir, CATALOG, f"{job.name}.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    tmp_dir = staging_dir(os.path.join(out_dir, job.name))
    try:
        try:
            rows, parts = _copy_raw(job, pool, tmp_dir, max_per_part)
        except UnsupportedTar as why:
            log.info("materialize: job %s reads its shards with tarfile (%s)", job.name, why)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            rows, parts = _copy_with_tarfile(job, pool, tmp_dir, max_per_part)
        record = dict(
            job=job.name,
            sources=[[s, pool[s], len(p)] for s, p in job.sources],
            parts={os.path.basename(path): dict(size=size, sha256=sha) for path, size, sha in parts},
            rows=rows,
        )
        # The marker is written inside the private folder and moved last: a run that cleaned up after
        # this job's driver died has removed that folder, so a late job can no longer publish a marker.
        staged = os.path.join(tmp_dir, "marker.json")
        _write_json_atomic(staged, record)
        for path, _, _ in parts:
            os.replace(path, os.path.join(out_dir, os.path.basename(path)))
        os.replace(staged, marker)
        return record
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _row(job_source: int, source: str, key: str, position: int, part: str, members: dict[str, bytes]) -> dict:
    return dict(
        id=int(make_ids(job_source, [position])[0]),
        key=key,
        shard=part,
        source_shard=source,
        source_index=job_source,
        position=position,
        members=sorted(members),
        sha256=sample_digest(members),
    )


class _RawPartWriter:
    """Parts made of raw tar records copied from source shards; each verified and hashed on close."""

    def __init__(self, folder: str, prefix: str, max_per_part: int):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.prefix, self.max_per_part = folder, prefix, max_per_part
        self.parts: list[tuple[str, int, str]] = []
        self._file = None
        self._count = 0

    def add(self, source, span) -> str:
        from sept.data.tar_scan import copy_records

        if self._file is not None and (self._count >= self.max_per_part or span.key in self._keys):
            self.close()
        if self._file is None:
            self._path = os.path.join(self.folder, f"{self.prefix}-{len(self.parts):06d}.tar")
            self._file = open(self._path, "wb")
            self._hash = hashlib.sha256()
            self._count, self._keys, self._size = 0, set(), 0
        self._size += copy_records(source, span, self._file, self._hash)
        self._keys.add(span.key)
        self._count += 1
        return os.path.basename(self._path)

    def close(self) -> None:
        from sept.data.tar_scan import END_OF_ARCHIVE, RECORD

        if self._file is None:
            return
        tail = END_OF_ARCHIVE + bytes(-(self._size + len(END_OF_ARCHIVE)) % RECORD)
        self._file.write(tail)
        self._hash.update(tail)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        size, sha = self._size + len(tail), self._hash.hexdigest()
        _verify_part(self._path, size, sha)
        self.parts.append((self._path, size, sha))


def _verify_part(path: str, size: int, sha256: str) -> None:
    """Read a written part back: the bytes on disk must be the bytes written, or it is not published.

    (What was written is right by construction: raw records copied from the source, whose reading
    the scanner shares with ``iter_samples``; this catches the disk or the file system.)
    """
    if file_digest(path) != (size, sha256):
        from sept.data.selection_writer import ShardVerificationError  # (imports webdataset: only when needed)

        raise ShardVerificationError(f"written part {path} reads back differently from what was written")


def _copy_raw(job: Job, pool: dict[int, str], tmp_dir: str, max_per_part: int) -> tuple[list[dict], list]:
    """The fast path: scan each source shard's headers, copy the wanted samples' tar records as they are."""
    from sept.data.tar_scan import UnsupportedTar, open_tar, read_members, scan_samples

    writer = _RawPartWriter(tmp_dir, f"{PART_PREFIX}{job.name}", max_per_part)
    rows = []
    for source_index, positions in job.sources:
        source = pool[source_index]
        wanted = set(positions)
        last = max(wanted)
        try:
            f = open_tar(source)
        except (OSError, ValueError):
            raise UnsupportedTar("source shard not readable") from None  # tarfile's path names the error
        with f:
            found = 0
            for span in scan_samples(f):
                if span.position in wanted:
                    members = read_members(f, span)
                    part = writer.add(f, span)
                    rows.append(_row(source_index, source, span.key, span.position, part, members))
                    found += 1
                if span.position >= last:
                    break
            if found < len(wanted):
                raise UnsupportedTar("fewer samples than wanted")  # tarfile's path raises the precise error
    writer.close()
    return rows, writer.parts


def _copy_with_tarfile(job: Job, pool: dict[int, str], tmp_dir: str, max_per_part: int) -> tuple[list[dict], list]:
    """The general path: ``tarfile`` reads every member; parts are written by ``SelectionShardWriter``."""
    from sept.data.selection_writer import SelectionShardWriter, extract_samples

    rows: list[dict] = []
    with SelectionShardWriter(tmp_dir, prefix=f"{PART_PREFIX}{job.name}", maxcount=max_per_part) as writer:
        part, keys = None, set()
        for source_index, positions in job.sources:
            source = pool[source_index]
            for sample in extract_samples(source, positions):
                if sample.key in keys:
                    writer.close()  # two samples with one key cannot share a tar: start a new part
                name = writer.write(sample)
                if name != part:
                    part, keys = name, set()
                keys.add(sample.key)
                rows.append(_row(source_index, source, sample.key, sample.position, name, sample.members))
    return rows, [(path, *file_digest(path)) for path in writer.shards]


@dataclass
class Catalog:
    """What a shared shard folder holds: every copied sample's row, and every part's size and hash."""

    rows: dict[int, dict]
    parts: dict[str, dict]
    jobs: list[str]


def read_catalog(out_dir: str) -> Catalog:
    rows: dict[int, dict] = {}
    parts: dict[str, dict] = {}
    jobs = []
    folder = os.path.join(out_dir, CATALOG)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            record = json.load(f)
        jobs.append(record["job"])
        parts.update(record["parts"])
        for row in record["rows"]:
            rows[int(row["id"])] = row
    return Catalog(rows=rows, parts=parts, jobs=jobs)


@contextmanager
def writer_lock(out_dir: str):
    """One writer per shared shard folder at a time; a second one is refused, not queued."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SeptError(f"another sept process is writing to {out_dir}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clean(out_dir: str) -> None:
    """Remove what a crashed run left: job folders, parts no done-marker names; drop jobs with damaged parts."""
    for name in os.listdir(out_dir):
        if is_staging_name(name):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    catalog = read_catalog(out_dir)  # read after the job folders are gone: no marker can appear any more
    for name in os.listdir(out_dir):
        if name.startswith(PART_PREFIX) and name.endswith(".tar") and name not in catalog.parts:
            log.warning("materialize: removing %s, left by an interrupted run", name)
            os.remove(os.path.join(out_dir, name))
    folder = os.path.join(out_dir, CATALOG)
    for job in catalog.jobs:
        with open(os.path.join(folder, f"{job}.json")) as f:
            record = json.load(f)
        broken = [
            p
            for p, info in record["parts"].items()
            if not os.path.exists(os.path.join(out_dir, p)) or os.path.getsize(os.path.join(out_dir, p)) != info["size"]
        ]
        if broken:
            log.warning(
                "materialize: part %s of job %s is missing or changed; copying its samples again", broken[0], job
            )
            os.remove(os.path.join(folder, f"{job}.json"))
            for p in record["parts"]:
                if os.path.exists(os.path.join(out_dir, p)):
                    os.remove(os.path.join(out_dir, p))


def materialize(ids, pool: list[str], out_dir: str, *, max_per_part: int = MAX_SAMPLES_PER_PART) -> list[dict]:
    """Make sure every sample with these global ids is in the shared shards at ``out_dir``; return their rows.

    Copies only samples not there yet. Rows are sorted by id. Needs a Ray session.
    """
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    with writer_lock(out_dir):
        os.makedirs(os.path.join(out_dir, CATALOG), exist_ok=True)
        _clean(out_dir)
        catalog = read_catalog(out_dir)
        new = np.asarray([i for i in ids.tolist() if i not in catalog.rows], dtype=np.int64)
        jobs = plan_jobs(new) if len(new) else []
        if len(new):
            n_pool = len(pool)
            bad = [int(s) for s in np.unique(split_ids(new)[0]) if s >= n_pool]
            if bad:
                raise SeptError(f"sample ids name pool shard {bad[0]} but the pool lists only {n_pool} shards")
        log.info(
            "materialize: %d samples wanted, %d already in %s, %d to copy in %d job(s)",
            len(ids),
            len(ids) - len(new),
            out_dir,
            len(new),
            len(jobs),
        )
        if jobs:
            refs = [
                materialize_job.remote(
                    job, {s: pool[s] for s, _ in job.sources}, os.path.abspath(out_dir), max_per_part
                )
                for job in jobs
            ]
            with tqdm(total=len(new), desc="materialize", unit="sample", disable=None) as bar:
                pending = refs
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    try:
                        record = ray.get(done[0])
                    except RayTaskError as err:
                        if isinstance(task_cause(err), SeptError):  # bad input (a changed pool shard): one line
                            raise SeptError(first_line(task_cause(err))) from None
                        raise
                    bar.update(len(record["rows"]))
            catalog = read_catalog(out_dir)
    missing = [i for i in ids.tolist() if i not in catalog.rows]
    if missing:
        shard, position = (int(v[0]) for v in split_ids([missing[0]]))
        raise SeptError(
            f"{len(missing)} selected samples were not copied, first position {position} of "
            f"{pool[shard]}; the pool shard changed since it was indexed"
        )
    return [catalog.rows[i] for i in ids.tolist()]


def _write_json_atomic(path: str, obj) -> None:
    atomic_write_json(path, obj, sort_keys=True, indent=None)
