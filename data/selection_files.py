"""The files of a selection folder, written atomically, and the rules that keep two runs from mixing.

Layout::

    SEL/selection.json              what every task here shares: the index and the encoder
    SEL/shards/part-*.tar           the shared shards (``sept.cluster.materialize``)
    SEL/tasks/TASK/task.json        the task's resolved config, and its summary once chosen
    SEL/tasks/TASK/choice.jsonl     its chosen samples: id, score, who chose and who retrieved each
    SEL/tasks/TASK/queries.jsonl    per target image: its class and its best chosen neighbours
    SEL/tasks/TASK/leakage.jsonl    pool samples excluded as too close to a held-out image, and to which
    SEL/tasks/TASK/manifest.jsonl   the choice joined with where each sample sits in the shards
    SEL/tasks/TASK/shards.json      size and sha256 of every shared shard the task uses

``choice.jsonl`` is written once the task is chosen; its presence lets an interrupted run skip
the search. Every file is JSON with sorted keys, so a rerun of the same command reproduces
every byte.
"""

from __future__ import annotations

import json
import os

from sept.data.task_subset import MANIFEST, SHARDS_DIR, SHARDS_FILE, TASKS_DIR, task_dir
from sept.errors import SeptError
from sept.io import atomic_write_text

SELECTION_FILE = "selection.json"
TASK_FILE = "task.json"
CHOICE_FILE = "choice.jsonl"
QUERIES_FILE = "queries.jsonl"
LEAKAGE_FILE = "leakage.jsonl"
KIND = "sept-selection"

__all__ = [
    "SELECTION_FILE",
    "TASK_FILE",
    "CHOICE_FILE",
    "QUERIES_FILE",
    "LEAKAGE_FILE",
    "MANIFEST",
    "SHARDS_FILE",
    "SHARDS_DIR",
    "TASKS_DIR",
    "task_dir",
    "write_json",
    "write_jsonl",
    "read_json",
    "read_jsonl",
    "claim_selection",
    "claim_task",
    "task_is_chosen",
    "tasks_in",
]


def write_json(path: str, obj) -> None:
    _write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_jsonl(path: str, rows) -> None:
    _write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_atomic(path: str, text: str) -> None:
    atomic_write_text(path, text)


def claim_selection(out: str, shared: dict, out_as_given: str) -> None:
    """Make ``out`` a selection folder for this index and encoder, or check that it already is one."""
    record = os.path.join(out, SELECTION_FILE)
    if os.path.exists(record):
        old = read_json(record)
        if old.get("kind") != KIND or old.get("shared") != shared:
            changed = sorted(k for k in shared if (old.get("shared") or {}).get(k) != shared[k])
            raise SeptError(
                f"{out_as_given} holds a selection from another index or encoder (differs in "
                f"{', '.join(changed) or 'kind'}); choose another --out"
            )
        return
    if os.path.exists(out) and [n for n in os.listdir(out) if n != ".lock"]:
        raise SeptError(f"{out_as_given} exists and does not hold a sept selection; choose another --out")
    write_json(record, dict(kind=KIND, shared=shared))


def claim_task(out: str, name: str, config: dict, out_as_given: str) -> None:
    """Record a task's config; the same task with another config is refused, never overwritten."""
    path = os.path.join(task_dir(out, name), TASK_FILE)
    if os.path.exists(path):
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
    return os.path.exists(os.path.join(task_dir(out, name), CHOICE_FILE))


def tasks_in(out: str) -> list[str]:
    """Every task of the selection folder that has been chosen, sorted."""
    root = os.path.join(out, TASKS_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if task_is_chosen(out, t))
