"""One task's subset of a selection's shared shards: its samples found, its shards checked, its samples read.

``sept select`` writes (layout: ``sept.data.selection_folder``), per task, ``SEL/tasks/TASK/manifest.jsonl`` (one row per selected sample:
key, id, shard, source shard and position, sample digest, score, and who retrieved it), the same
samples as arrays in ``SEL/tasks/TASK/samples.zarr`` (``sept.data.task_samples``), and
``SEL/tasks/TASK/shards.json`` (every shared shard the task uses, with its size and sha256).
Many tasks share the shards in ``SEL/shards/``; this module reads back one task's samples only.
A shard that is missing, or whose size or hash differs from what the selection recorded, is a
``SeptError`` naming the shard and the manifest: the subset is never read silently wrong.

For the trainer: ``open_task_data("SEL/tasks/TASK")`` (or the manifest's path) gives the shard
list and ``TaskSubset.samples``: per shard its count, and, read only when asked, its keys and
its samples' pool ids. Opening reads ``samples.zarr``'s attributes and offsets, never the
manifest's rows; a selection written before ``samples.zarr`` existed is read from
``manifest.jsonl`` whole, with a warning to rerun ``sept select``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

from sept import storage
from sept.data.samples import PoolSample, ShardStats, iter_samples
from sept.data.selection_folder import (
    MANIFEST,
    SHARDS_DIR,
    SHARDS_FILE,
    TASKS_DIR,
    is_selection_dir,
    list_tasks,
    read_manifest,
    task_dir,
)
from sept.data.task_samples import SAMPLES_GROUP, TaskSamples, has_task_samples
from sept.errors import SeptError
from sept.io import file_digest

log = logging.getLogger(__name__)

VERIFY_MODES = ("hash", "size", "none")


@dataclass
class TaskSubset:
    task: str
    selection_dir: str
    shards: list[str]
    """Absolute paths (or URLs) of the shared shards holding the task's samples, sorted."""
    samples: TaskSamples
    """Per shard of ``shards`` (same index): its sample count, keys and pool ids."""

    def __len__(self) -> int:
        return self.samples.total


def load_task_subset(selection_dir: str, task: str, *, verify: str = "hash") -> TaskSubset:
    """The task's samples and shards, each shard checked against the selection's record.

    ``verify``: "hash" checks size and sha256 (reads every shard once), "size" only the size,
    "none" nothing. Raises ``SeptError`` for a missing or changed shard.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    folder = task_dir(selection_dir, task)
    manifest_path = storage.join(folder, MANIFEST)
    if has_task_samples(folder):
        samples = TaskSamples.open(folder)
        named_by = storage.join(folder, SAMPLES_GROUP)
    else:
        rows = read_manifest(selection_dir, task)
        log.warning(
            "task %r has no %s (selected before it existed): every rank reads %s whole; rerun `sept select`"
            " with the same arguments to write it",
            task,
            SAMPLES_GROUP,
            manifest_path,
        )
        samples = TaskSamples.from_manifest_rows(rows, manifest_path)
        named_by = manifest_path
    shards_path = storage.join(folder, SHARDS_FILE)
    if not storage.isfile(shards_path):
        raise SeptError(f"task {task!r}: {shards_path} is missing; rerun `sept select` to write it")
    with storage.open_file(shards_path, "r") as f:
        recorded: dict[str, dict] = json.load(f)
    unknown = [name for name in samples.shards if name not in recorded]
    if unknown:
        raise SeptError(f"task {task!r}: {named_by} names shard {unknown[0]} that {shards_path} does not record")
    shard_root = storage.join(storage.resolve(selection_dir), SHARDS_DIR)
    shards = [storage.join(shard_root, name) for name in samples.shards]
    for path in shards:
        check_shard(path, recorded[storage.basename(path)], verify=verify, named_by=named_by)
    return TaskSubset(task=task, selection_dir=storage.resolve(selection_dir), shards=shards, samples=samples)


def check_shard(path: str, record: dict, *, verify: str = "hash", named_by: str = "") -> None:
    """Raise ``SeptError`` if the shard at ``path`` is missing or differs from ``record`` (size, sha256)."""
    if verify == "none":
        return
    where = f" (named by {named_by})" if named_by else ""
    if not storage.isfile(path):
        raise SeptError(f"shared shard {path} is missing{where}")
    size = storage.size(path)
    if size != record["size"]:
        raise SeptError(f"shared shard {path} changed since selection: {size} bytes, recorded {record['size']}{where}")
    if verify == "hash":
        if file_digest(path)[1] != record["sha256"]:
            raise SeptError(f"shared shard {path} changed since selection: its sha256 differs from the record{where}")


def iter_task_samples(subset: TaskSubset, stats: ShardStats | None = None) -> Iterator[PoolSample]:
    """The task's samples, exactly as stored, shard by shard (each shard read once, in sorted order)."""
    for path, wanted in zip(subset.shards, subset.samples, strict=True):
        found = 0
        with closing(iter_samples(path, stats)) as samples:
            for sample in samples:
                if sample.key in wanted:
                    found += 1
                    yield sample
        if found != len(wanted):
            raise SeptError(
                f"shared shard {path} holds {found} of the {len(wanted)} samples task {subset.task!r} expects there"
            )


def open_task_data(path: str, *, verify: str = "size") -> TaskSubset:
    """A task subset from its folder (``SEL/tasks/TASK``) or its manifest's path: the trainer's entry point."""
    path = storage.resolve(path)
    if storage.basename(path) == MANIFEST:
        path = storage.dirname(path)
    task = storage.basename(path)
    tasks_root = storage.dirname(path)
    if storage.basename(tasks_root) != TASKS_DIR:
        raise SeptError(f"{path} is not a task folder of a selection (SEL/{TASKS_DIR}/TASK)")
    return load_task_subset(storage.dirname(tasks_root), task, verify=verify)


def resolve_training_data(data: str, task: str | None = None) -> str:
    """What a trainer reads, from what a user names: a task folder (``SEL/tasks/TASK``) or its
    manifest, a selection folder with ``task`` (or holding exactly one task), or any pool spec
    (returned as given). Raises ``SeptError`` naming the folder and its tasks when the choice is
    ambiguous or the task is unknown."""
    if is_selection_dir(data):
        tasks = list_tasks(data)
        if task is None:
            if len(tasks) != 1:
                raise SeptError(
                    f"{data} is a selection of {len(tasks)} tasks ({', '.join(tasks) or 'none'}); name one with --task"
                )
            task = tasks[0]
        elif task not in tasks:
            raise SeptError(f"no task {task!r} in the selection {data} (tasks there: {', '.join(tasks) or 'none'})")
        return task_dir(data, task)
    if task is not None:
        raise SeptError(
            f"--task {task} needs a selection folder, and {data} is not one (no {TASKS_DIR}/ and {SHARDS_DIR}/ in it)"
        )
    return data


def is_task_data(path: str) -> bool:
    """Whether ``path`` names a task subset (its folder or manifest) rather than shards."""
    path = storage.resolve(path)
    return storage.basename(path) == MANIFEST or storage.isfile(storage.join(path, MANIFEST))
