"""Which target tasks one ``sept select`` run is for: ``--target``/``--task`` flags or a YAML file, checked.

A YAML task file is either a list of tasks or a mapping with optional defaults and ``tasks``::

    budget: 5000            # default budget of every task
    tasks:
      - name: digits        # default: the target folder's name
        target: digits/     # relative paths are taken from the YAML file's folder
      - target: /data/flowers
        budget: 20000

Also here: the held-out images of a task (``val/`` and, if present, ``test/``), which the
leakage guard keeps out of every selection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sept.data.samples import IMAGE_EXTS, iter_samples
from sept.errors import SeptError, first_line

_TASK_KEYS = {"name", "target", "budget"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    target: str  # absolute path of the target folder
    budget: int


def resolve_tasks(
    targets: list[str], names: list[str], budget: int | None, tasks_file: str | None, ntotal: int | None = None
) -> list[TaskSpec]:
    """The run's tasks, in the order given. Raises ``SeptError`` for a name given twice, a missing
    budget, a budget of zero or less, or (given ``ntotal``) a budget above the indexed pool."""
    specs: list[TaskSpec] = []
    if names and len(names) != len(targets):
        raise SeptError(f"{len(names)} --task names for {len(targets)} --target folders; give one name per target")
    for i, target in enumerate(targets):
        specs.append(_spec(names[i] if names else "", target, budget, "--target"))
    if tasks_file:
        specs.extend(_read_tasks_file(tasks_file, budget))
    if not specs:
        raise SeptError("no target task given: pass --target DIR (repeatable) or --tasks TASKS.yaml")
    seen: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise SeptError(
                f"task name {spec.name!r} is given twice ({seen[spec.name].target} and {spec.target}); "
                "name each task once"
            )
        seen[spec.name] = spec
        if ntotal is not None and spec.budget > ntotal:
            raise SeptError(
                f"budget {spec.budget} of task {spec.name!r} is larger than the pool's {ntotal} indexed samples"
            )
    return specs


def _spec(name: str, target: str, budget, where: str) -> TaskSpec:
    if not target:
        raise SeptError(f"a task in {where} has no target folder")
    path = os.path.abspath(os.path.expanduser(str(target)))
    name = str(name or os.path.basename(path.rstrip(os.sep)))
    if not name or "/" in name or name.startswith("."):
        raise SeptError(f"task name {name!r} (target {path}) must be a plain folder name")
    if budget is None:
        raise SeptError(f"task {name!r} has no budget: pass --budget or give one in the task file")
    try:
        budget = int(budget)
    except (TypeError, ValueError):
        raise SeptError(f"task {name!r} has a budget that is not a whole number: {budget!r}") from None
    if budget <= 0:
        raise SeptError(f"task {name!r} has budget {budget}; a budget must be positive")
    return TaskSpec(name=name, target=path, budget=budget)


def _read_tasks_file(path: str, default_budget: int | None) -> list[TaskSpec]:
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as err:
        raise SeptError(f"cannot read task file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SeptError(f"task file {path} is not valid YAML: {first_line(err)}") from None
    if isinstance(doc, dict):
        default_budget = doc.get("budget", default_budget)
        entries = doc.get("tasks")
    else:
        entries = doc
    if not isinstance(entries, list) or not entries:
        raise SeptError(f"task file {path} lists no tasks (expected a list, or a mapping with 'tasks:')")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"target": entry}
        if not isinstance(entry, dict) or set(entry) - _TASK_KEYS:
            extra = sorted(set(entry) - _TASK_KEYS) if isinstance(entry, dict) else [type(entry).__name__]
            raise SeptError(f"task {i} in {path} has unknown fields {extra}; use name, target, budget")
        target = entry.get("target", "")
        if target and not os.path.isabs(os.path.expanduser(str(target))):
            target = os.path.join(base, str(target))
        specs.append(_spec(entry.get("name", ""), target, entry.get("budget", default_budget), path))
    return specs


def heldout_refs(target_dir: str, val_refs: list[str]) -> list[str]:
    """Image references the selection must not leak: the task's val images and any under test/.

    ``test/`` may be an ImageFolder (any depth) or hold WebDataset tar shards (``TAR#KEY`` refs).
    """
    refs = list(val_refs)
    test_dir = os.path.join(target_dir, "test")
    if not os.path.isdir(test_dir):
        return refs
    for dirpath, dirnames, filenames in os.walk(test_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            ext = filename.rpartition(".")[2].lower()
            if filename.startswith("."):
                continue
            if ext in IMAGE_EXTS:
                refs.append(path)
            elif ext == "tar":
                refs.extend(f"{path}#{sample.key}" for sample in iter_samples(path))
    return refs
