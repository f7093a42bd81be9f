"""Copying selected pool samples, byte for byte, into a selection's shared shards: one copy job at a time.

A *job* is a run of consecutive source shards (``plan_jobs``). ``copy_job`` reads each of its
source shards once and writes its parts into a private staging folder; the verified parts are
renamed into place and the job's done-marker (``sept.data.selection_folder``'s catalog) is moved
in last. A selected sample is copied as the raw bytes of its tar records (``sept.data.tar_scan``:
headers and data, so every member, the original ``.json`` included, is exactly as in the pool); a
source shard the scanner does not follow is read with ``tarfile`` and rewritten by
``SelectionShardWriter`` instead. A job's name is a digest of the (source shard, position) pairs
it copies, so the same selection gives the same file names and bytes, and a rerun after a crash
redoes exactly the unfinished jobs.

Nothing here knows of Ray: ``sept.cluster.materialize`` runs the jobs as Ray tasks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np

from sept import storage
from sept.data.identity import make_ids, split_ids
from sept.data.selection_folder import PART_PREFIX, catalog_marker, read_json
from sept.data.selection_writer import SelectionShardWriter, extract_samples
from sept.data.tar_scan import (
    UnsupportedTar,
    open_tar,
    read_members,
    scan_samples,
)
from sept.io import atomic_write_json, move_into_place, staging_dir

log = logging.getLogger(__name__)

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


def copy_job(job: Job, pool: dict[int, str], out_dir: str, max_per_part: int = MAX_SAMPLES_PER_PART) -> dict:
    """Copy one job's samples into parts, rename them into ``out_dir``, write its done-marker; return the marker.

    ``pool`` maps the job's source shard indices to their paths. A job whose marker exists is not
    copied again.
    """
    marker = catalog_marker(out_dir, job.name)
    if storage.exists(marker):
        return read_json(marker)
    tmp_dir = staging_dir(storage.join(out_dir, job.name))
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
        # (For a URL the folder is on this worker's disk, and the parts are uploaded before the marker.)
        staged = os.path.join(tmp_dir, "marker.json")
        atomic_write_json(staged, record, sort_keys=True, indent=None)
        for path, _, _ in parts:
            move_into_place(path, storage.join(out_dir, os.path.basename(path)))
        move_into_place(staged, marker)
        return record
    finally:
        shutil.rmtree(tmp_dir if not storage.is_url(out_dir) else os.path.dirname(tmp_dir), ignore_errors=True)


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


def _copy_raw(job: Job, pool: dict[int, str], tmp_dir: str, max_per_part: int) -> tuple[list[dict], list]:
    """The fast path: scan each source shard's headers, copy the wanted samples' tar records as they are."""
    rows = []
    with SelectionShardWriter(
        tmp_dir, prefix=f"{PART_PREFIX}{job.name}", maxcount=max_per_part, new_part_on_repeated_key=True
    ) as writer:
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
                        part = writer.write_records(f, span)
                        rows.append(_row(source_index, source, span.key, span.position, part, members))
                        found += 1
                    if span.position >= last:
                        break
                if found < len(wanted):
                    raise UnsupportedTar("fewer samples than wanted")  # tarfile's path raises the precise error
    return rows, writer.parts


def _copy_with_tarfile(job: Job, pool: dict[int, str], tmp_dir: str, max_per_part: int) -> tuple[list[dict], list]:
    """The general path: ``tarfile`` reads every member; parts are written by ``SelectionShardWriter``."""
    rows: list[dict] = []
    with SelectionShardWriter(
        tmp_dir, prefix=f"{PART_PREFIX}{job.name}", maxcount=max_per_part, new_part_on_repeated_key=True
    ) as writer:
        for source_index, positions in job.sources:
            source = pool[source_index]
            for sample in extract_samples(source, positions):
                name = writer.write(sample)
                rows.append(_row(source_index, source, sample.key, sample.position, name, sample.members))
    return rows, writer.parts
