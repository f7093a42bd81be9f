"""What `sept pretrain --data [--task]` resolves to: a task folder, a selection with a task, or a pool spec."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
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


# --- a task's samples as trainers read them (samples.zarr beside manifest.jsonl) -------------------

POOL_SHARDS, PER_POOL_SHARD, PART_SIZE = 3, 12, 5


@pytest.fixture
def selection(tmp_path):
    """A selection of one task made by the real copy jobs (no Ray): 24 of 36 pool samples, chosen
    in a shuffled order, copied into parts of at most 5 samples; keys of several lengths."""
    import webdataset as wds

    from sept.data.identity import make_ids
    from sept.data.selection_folder import (
        CHOICE_FILE,
        read_catalog,
        shards_dir,
        task_dir,
        write_jsonl,
        write_manifest,
    )
    from sept.data.shard_copy import copy_job, plan_jobs

    pool = []
    for s in range(POOL_SHARDS):
        path = str(tmp_path / "pool" / f"{s:05d}.tar")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with wds.TarWriter(path, encoder=False) as sink:
            for p in range(PER_POOL_SHARD):
                key = f"s{s}/" + "k" * (1 + (p * 7) % 11) + f"{p}"  # lengths differ; a '/' as webdataset allows
                sink.write({"__key__": key, "txt": f"{s}:{p}".encode()})
        pool.append(path)
    rng = np.random.default_rng(0)
    everything = np.concatenate([make_ids(s, range(PER_POOL_SHARD)) for s in range(POOL_SHARDS)])
    chosen = rng.permutation(everything)[:24]
    sel = str(tmp_path / "sel")
    shards = shards_dir(sel)
    os.makedirs(os.path.join(shards, ".catalog"))
    for job in plan_jobs(chosen):
        copy_job(job, dict(enumerate(pool)), shards, max_per_part=PART_SIZE)
    write_jsonl(os.path.join(task_dir(sel, "t"), CHOICE_FILE), [dict(id=int(i), score=0.5) for i in chosen])
    write_manifest(sel, "t", read_catalog(shards))
    return sel


def _manifest_rows(sel: str) -> list[dict]:
    from sept.data.selection_folder import read_manifest

    return read_manifest(sel, "t")


def _tree(root: str) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, n), root): Path(os.path.join(d, n)).read_bytes()
        for d, _, names in os.walk(root)
        for n in names
    }


def test_samples_group_matches_the_manifest_row_for_row(selection):
    from sept.data.selection_folder import read_catalog, shards_dir, task_dir, write_manifest
    from sept.data.task_samples import SAMPLES_GROUP, TaskSamples

    rows = _manifest_rows(selection)
    assert len(rows) == 24 and len({(r["shard"], r["key"]) for r in rows}) == 24
    samples = TaskSamples.open(task_dir(selection, "t"))
    assert samples.shards == sorted({r["shard"] for r in rows}) and len(samples.shards) >= 5
    assert samples.total == 24 and samples.counts.tolist() == [
        sum(r["shard"] == name for r in rows) for name in samples.shards
    ]
    from_arrays = []
    for s, name in enumerate(samples.shards):
        keys, ids = samples.rows(s)
        assert keys.tolist() == sorted(keys.tolist()), "a shard's keys are sorted: one binary search finds a sample"
        from_arrays += [(name, k.decode(), int(i)) for k, i in zip(keys.tolist(), ids.tolist())]
    assert from_arrays == sorted((r["shard"], r["key"], int(r["id"])) for r in rows)
    # A rerun leaves the group alone (a trainer may be reading it); one written anew has the same bytes.
    group = os.path.join(task_dir(selection, "t"), SAMPLES_GROUP)
    before, stamp = _tree(group), os.stat(os.path.join(group, "zarr.json")).st_mtime_ns
    write_manifest(selection, "t", read_catalog(shards_dir(selection)))
    assert os.stat(os.path.join(group, "zarr.json")).st_mtime_ns == stamp
    shutil.rmtree(group)
    write_manifest(selection, "t", read_catalog(shards_dir(selection)))
    assert _tree(group) == before


def _shards_touched(counts: list[int], order: np.ndarray, first: int, stop: int) -> set[int]:
    """The shards an epoch block [first, stop) of the shard order covers."""
    touched, offset = set(), 0
    for s in order.tolist():
        if offset < stop and offset + counts[s] > first:
            touched.add(s)
        offset += counts[s]
    return touched


def test_each_rank_reads_only_its_shards_and_the_ranks_cover_every_sample_once(selection):
    """Three ranks, each opening the task as a real rank does: none parses the manifest (it is
    garbage here), each reads the keys of the shards its epoch block touches and no others, and
    together they read every sample of the task once."""
    from sept.data.task_subset import open_task_data
    from sept.training.decoding import SampleCache
    from sept.training.shard_assignment import ShardAssignment, seed_of

    rows = _manifest_rows(selection)
    with open(os.path.join(selection, TASKS_DIR, "t", MANIFEST), "w") as f:
        f.write("not json\n")
    seen: list[tuple[str, str]] = []
    for rank in range(3):
        subset = open_task_data(os.path.join(selection, TASKS_DIR, "t"))
        read: list[int] = []
        rows_of = subset.samples.rows
        subset.samples.rows = lambda s, rows_of=rows_of, read=read: read.append(s) or rows_of(s)
        plan = ShardAssignment(
            subset.shards,
            batch_size=1,
            rank=rank,
            world_size=3,
            seed=5,
            shard_counts=subset.samples.counts.tolist(),
            keys=subset.samples,
            max_samples=None,
            num_workers=0,
        )
        assert read == [], "opening reads offsets only, no shard's rows"
        first, stop = rank * 8, rank * 8 + 8
        got = [(os.path.basename(subset.shards[s]), x.key) for s, x in plan.read_range(0, first, stop, SampleCache(0))]
        order = np.random.default_rng(seed_of(5, 0)).permutation(len(subset.shards))
        assert set(read) == _shards_touched(plan.shard_counts, order, first, stop)
        assert len(got) == 8
        seen += got
    assert sorted(seen) == sorted((r["shard"], r["key"]) for r in rows), "every sample once, nothing else"


def test_pool_ids_from_the_arrays_equal_the_manifests(selection):
    from sept.data.identity import make_ids
    from sept.data.samples import iter_samples
    from sept.data.task_subset import open_task_data
    from sept.training.run_data import PoolIds

    rows = _manifest_rows(selection)
    subset = open_task_data(os.path.join(selection, TASKS_DIR, "t"))
    ids, keys, expected = [], [], []
    manifest_id = {(r["shard"], r["key"]): int(r["id"]) for r in rows}
    for index, shard in enumerate(subset.shards):
        for sample in iter_samples(shard):
            if (os.path.basename(shard), sample.key) in manifest_id:
                ids.append(int(make_ids(index, [sample.position])[0]))
                keys.append(sample.key)
                expected.append(manifest_id[(os.path.basename(shard), sample.key)])
    order = np.random.default_rng(1).permutation(len(ids))  # a batch mixes shards
    pool_ids = PoolIds(subset.samples)
    assert pool_ids.of(np.asarray(ids)[order], [keys[i] for i in order]) == [expected[i] for i in order]
    assert len(expected) == 24 and set(expected) != set(ids)
    with pytest.raises(SeptError, match="not among the task's samples"):
        pool_ids.of(np.asarray(ids[:1]), [keys[0] + "x"])  # a longer key: not a prefix match


def test_a_selection_without_samples_zarr_is_read_from_its_manifest(selection, caplog):
    """Selections written before samples.zarr: the manifest is read whole, with a warning, and
    gives the same samples and pool ids."""
    from sept.data.task_samples import SAMPLES_GROUP
    from sept.data.task_subset import iter_task_samples, open_task_data
    from sept.training.run_data import PoolIds

    folder = os.path.join(selection, TASKS_DIR, "t")
    new = open_task_data(folder)
    new_keys = list(new.samples)
    shard_index = np.repeat(np.arange(len(new.shards)), new.samples.counts)
    ids = shard_index.astype(np.int64) << 32
    sorted_keys = [k for keys in new_keys for k in sorted(keys)]
    new_pool_ids = PoolIds(new.samples).of(ids, sorted_keys)
    shutil.rmtree(os.path.join(folder, SAMPLES_GROUP))
    caplog.set_level("WARNING", logger="sept.data.task_subset")
    old = open_task_data(folder)
    assert "rerun `sept select`" in caplog.text
    assert old.shards == new.shards and old.samples.counts.tolist() == new.samples.counts.tolist()
    assert list(old.samples) == new_keys
    assert PoolIds(old.samples).of(ids, sorted_keys) == new_pool_ids
    keys = [s.key for s in iter_task_samples(old)]
    assert sorted(keys) == sorted(r["key"] for r in _manifest_rows(selection))


def test_a_damaged_samples_group_is_one_line_naming_it(selection):
    import json

    from sept.data.task_samples import SAMPLES_GROUP
    from sept.data.task_subset import open_task_data

    meta = os.path.join(selection, TASKS_DIR, "t", SAMPLES_GROUP, "zarr.json")
    with open(meta) as f:
        group = json.load(f)
    group["attributes"]["rows"] = 23
    with open(meta, "w") as f:
        json.dump(group, f)
    with pytest.raises(SeptError, match=f"{SAMPLES_GROUP} is damaged.*rerun `sept select`"):
        open_task_data(os.path.join(selection, TASKS_DIR, "t"))
