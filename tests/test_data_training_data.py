"""What `sept pretrain --data [--task]` resolves to: a task folder, a selection with a task, or a pool spec."""

from __future__ import annotations

import os

import pytest

from sept.data.selection_folder import MANIFEST, SHARDS_DIR, TASKS_DIR
from sept.data.task_subset import resolve_training_data
from sept.errors import SeptError


def _selection(root, tasks: list[str]) -> str:
    sel = root / "sel"
    (sel / SHARDS_DIR).mkdir(parents=True)
    for task in tasks:
        (sel / TASKS_DIR / task).mkdir(parents=True)
        (sel / TASKS_DIR / task / MANIFEST).write_text("")
    return str(sel)


def test_a_selection_with_task_resolves_to_the_task_folder(tmp_path):
    sel = _selection(tmp_path, ["cats", "dogs"])
    assert resolve_training_data(sel, "dogs") == os.path.join(sel, TASKS_DIR, "dogs")


def test_a_selection_of_one_task_needs_no_task(tmp_path):
    sel = _selection(tmp_path, ["cats"])
    assert resolve_training_data(sel) == os.path.join(sel, TASKS_DIR, "cats")


def test_ambiguous_or_unknown_tasks_are_one_line_naming_the_tasks(tmp_path):
    sel = _selection(tmp_path, ["cats", "dogs"])
    with pytest.raises(SeptError, match="2 tasks \\(cats, dogs\\); name one with --task"):
        resolve_training_data(sel)
    with pytest.raises(SeptError, match="no task 'owls' in the selection .*cats, dogs"):
        resolve_training_data(sel, "owls")


def test_task_folders_and_pool_specs_pass_through(tmp_path):
    sel = _selection(tmp_path, ["cats"])
    folder = os.path.join(sel, TASKS_DIR, "cats")
    assert resolve_training_data(folder) == folder
    assert resolve_training_data("pool/{00000..00009}.tar") == "pool/{00000..00009}.tar"
    with pytest.raises(SeptError, match="--task cats needs a selection folder"):
        resolve_training_data("pool/{00000..00009}.tar", "cats")
