"""Materialization on Ray: every selected sample copied once into a selection's shared shards.

The output folder is a store that grows: every sample in it was copied once, whatever number of
tasks selected it, and a later run copies only the samples it does not hold yet. Each copy job
(``sept.data.shard_copy``) is one Ray task; its layout and done-markers are
``sept.data.selection_folder``'s. Parts without a marker (a crash between rename and marker) are
deleted before new work starts, so no sample is ever held twice.
"""

from __future__ import annotations

import logging

import numpy as np
import ray
from ray.exceptions import RayTaskError
from tqdm import tqdm

from sept import storage
from sept.cluster.runtime import completed_with_deadline
from sept.data.identity import split_ids
from sept.data.selection_folder import CATALOG, Catalog, discard_unfinished, read_catalog, writer_lock
from sept.data.shard_copy import MAX_SAMPLES_PER_PART, copy_job, plan_jobs
from sept.errors import SeptError, first_line, task_cause

log = logging.getLogger(__name__)

materialize_job = ray.remote(num_cpus=1, max_retries=2)(copy_job)
JOB_TIMEOUT_S = 1800.0  # a job copies about 60 MB; only a stalled read takes half an hour
JOB_ATTEMPTS = 3


def materialize(
    ids,
    pool: list[str],
    out_dir: str,
    *,
    max_per_part: int = MAX_SAMPLES_PER_PART,
    timeout_s: float = JOB_TIMEOUT_S,
) -> Catalog:
    """Make sure every sample with these global ids is in the shared shards at ``out_dir``; return
    the folder's catalog (``Catalog.row`` gives a sample's row).

    Copies only samples not there yet. Needs a Ray session. A copy job with
    no result after ``timeout_s`` is retried; after ``JOB_ATTEMPTS`` tries the run stops naming it.
    """
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    with writer_lock(out_dir):
        storage.makedirs(storage.join(out_dir, CATALOG))
        discard_unfinished(out_dir)
        catalog = read_catalog(out_dir)
        new = ids[~catalog.has(ids)]
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
            target = storage.resolve(out_dir)

            def submit(job):
                return materialize_job.remote(job, {s: pool[s] for s, _ in job.sources}, target, max_per_part)

            def describe(job) -> str:
                return f"materialize: copy job {job.name} (from {pool[job.sources[0][0]]})"

            finished = completed_with_deadline(
                jobs, submit, timeout_s=timeout_s, attempts=JOB_ATTEMPTS, describe=describe
            )
            with tqdm(total=len(new), desc="materialize", unit="sample", disable=None) as bar:
                for _, ref in finished:
                    try:
                        record = ray.get(ref)
                    except RayTaskError as err:
                        if isinstance(task_cause(err), SeptError):  # bad input (a changed pool shard): one line
                            raise SeptError(first_line(task_cause(err))) from None
                        raise
                    bar.update(len(record["rows"]))
            catalog = read_catalog(out_dir)
    missing = ids[~catalog.has(ids)]
    if len(missing):
        shard, position = (int(v[0]) for v in split_ids(missing[:1]))
        raise SeptError(
            f"{len(missing)} selected samples were not copied, first position {position} of "
            f"{pool[shard]}; the pool shard changed since it was indexed"
        )
    return catalog
