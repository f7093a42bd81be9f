"""Many tasks, one pool, end to end through `sept select` on the real two-node Ray cluster: one search and
one set of shared shards for two tasks, per-task manifests and a loader, a task added later copying only
its new samples, byte-for-byte reruns, resume after a kill, and clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import VENV_BIN
from PIL import Image

from sept.data.demo_corpus import make_demo_corpus
from sept.data.samples import iter_samples
from sept.data.task_samples import TaskSamples
from sept.data.task_subset import iter_task_samples, load_task_subset, open_task_data
from sept.errors import SeptError
from sept.io import is_staging_name

pytestmark = pytest.mark.integration

BUDGET = 40


def make_domain_target(root: str, domain: str, per_class: int = 3, val_per_class: int = 2, seed: int = 7) -> str:
    """A second target task, freshly drawn by the demo's own renderer of a pool domain; the classes are
    the kinds its captions name ("a filled circle" -> circle, "a dots pattern" -> dots)."""
    from sept.data.demo_corpus import _RENDERERS  # same look as the pool's images of that domain

    rng = np.random.default_rng(seed)
    made: dict[tuple[str, str], int] = {}
    kinds: set[str] = set()
    for _ in range(400):
        image, caption = _RENDERERS[domain](32, rng)
        kind = _kind(caption)
        kinds.add(kind)
        for split, n in (("train", per_class), ("val", val_per_class)):
            if made.get((split, kind), 0) < n:
                folder = os.path.join(root, split, kind)
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(image).save(os.path.join(folder, f"{made.get((split, kind), 0):03d}.png"))
                made[(split, kind)] = made.get((split, kind), 0) + 1
                break
    return root


def _kind(caption: str) -> str:
    words = caption.split()
    return words[-2] if words[-1] == "pattern" else words[-1]


def _tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name == ".lock":
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _manifest(sel: str, task: str) -> list[dict]:
    with open(os.path.join(sel, "tasks", task, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def _shard_keys(sel: str) -> list[str]:
    keys = []
    folder = os.path.join(sel, "shards")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            keys.extend(s.key for s in iter_samples(os.path.join(folder, name)))
    return keys


def make_edge_encoder(path: str, calibration: list[Image.Image]) -> str:
    """A small untrained ResNet that sees edges, not colours: its stem is fixed grayscale +/- derivative
    filters and its batch-norm statistics are measured on pool images. The demo's images differ in random
    colours, which a randomly initialised stem sees first; this one retrieves by shape in seconds, where
    bootstrapping a real encoder takes minutes on two cores."""
    import torch

    from sept.training.encoder import build_backbone, load_encoder, save_encoder

    torch.manual_seed(0)
    model, _ = build_backbone("resnet18_small")
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    filters = [
        sobel,
        sobel.T,
        torch.tensor([[0.0, 1, 2], [-1, 0, 1], [-2, -1, 0]]),
        torch.tensor([[2.0, 1, 0], [1, 0, -1], [0, -1, -2]]),
        torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]),
        torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]]),
        torch.tensor([[1.0, 0, -1], [0, 0, 0], [-1, 0, 1]]),
        torch.tensor([[-1.0, 2, -1], [-1, 2, -1], [-1, 2, -1]]),
    ]
    stem = torch.zeros_like(model.conv1.weight)
    for i, f in enumerate(filters):
        stem[2 * i, :] = f / f.abs().sum() / 3
        stem[2 * i + 1, :] = -f / f.abs().sum() / 3
    with torch.no_grad():
        model.conv1.weight.copy_(stem)
    kwargs = dict(arch="resnet18_small", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    save_encoder(path, model, **kwargs)
    batch = torch.stack([load_encoder(path, device="cpu").preprocess(im) for im in calibration])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()
    save_encoder(path, model, **kwargs)
    return path


LEAK_KEYS = ("leak0000", "leak0001")


def write_leak_shard(path: str, images: list[str]) -> None:
    """A pool shard holding exact copies of target val images (as img2dataset would write PNGs)."""
    import webdataset as wds

    with wds.TarWriter(path) as sink:
        for key, image in zip(LEAK_KEYS, images):
            with open(image, "rb") as f:
                sink.write({"__key__": key, "png": f.read(), "json": json.dumps({"key": key}).encode()})


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_cluster):
    from sept.data.decode import decode_image
    from sept.data.shards import list_shards

    root = tmp_path_factory.mktemp("select_tasks")
    corpus = make_demo_corpus(
        str(root / "corpus"), pool_size=480, shards=4, target_train_per_class=3, target_val_per_class=2, seed=2
    )
    gradients = make_domain_target(str(root / "gradients"), "gradients")
    val_digits = sorted(
        os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(corpus.target_dir, "val")) for f in fs
    )
    leak = str(root / "leak.tar")
    write_leak_shard(leak, val_digits[:2])
    pool = root / "pool.txt"
    pool.write_text("\n".join(list_shards(corpus.pool_spec) + [leak]) + "\n")
    calibration = [
        decode_image(s.members["jpg"]) for shard in list_shards(corpus.pool_spec) for s in iter_samples(shard)
    ][::2]
    encoder = make_edge_encoder(str(root / "enc.pt"), calibration)
    w = dict(
        root=root,
        corpus=corpus,
        gradients=gradients,
        encoder=encoder,
        emb=str(root / "emb.zarr"),
        index=str(root / "index.zarr"),
        sel=str(root / "sel"),
        truth=corpus.truth(),
        leak=leak,
    )
    ray_cluster.run_sept(
        "embed", "--pool", str(pool), "--encoder", encoder, "--out", w["emb"], "--workers", "2", "--batch-size", "64"
    )
    ray_cluster.run_sept("index", "--embeddings", w["emb"], "--out", w["index"], "--shards", "4", "--factory", "Flat")
    w["two_tasks"] = [
        "--index",
        w["index"],
        "--encoder",
        encoder,
        "--target",
        corpus.target_dir,
        "--task",
        "digits",
        "--target",
        gradients,
        "--task",
        "gradients",
        "--budget",
        str(BUDGET),
    ]
    proc = ray_cluster.run_sept("select", *w["two_tasks"], "--out", w["sel"])
    w["summary"] = json.loads(proc.stdout[proc.stdout.index("{") :])
    w["first_run"] = _tree_digest(w["sel"])
    return w


def test_two_tasks_share_one_set_of_shards_and_are_precise(world):
    sel, truth = world["sel"], world["truth"]
    digits, gradients = _manifest(sel, "digits"), _manifest(sel, "gradients")
    assert len(digits) == len(gradients) == BUDGET
    union = {r["id"] for r in digits} | {r["id"] for r in gradients}
    keys = _shard_keys(sel)
    assert len(keys) == len(set(keys)) == len(union), "every selected sample is held exactly once"
    assert world["summary"]["samples"] == len(union)
    for rows, domain in ((digits, "digits"), (gradients, "gradients")):
        base = np.mean([v == domain for v in truth.values()])
        precision = np.mean([truth.get(r["key"]) == domain for r in rows])
        assert precision >= 2 * base, f"{domain}: precision {precision:.2f}, base rate {base:.2f}"
        assert all(r["retrieved_by"] and r["chosen_by"] in r["retrieved_by"] for r in rows)
    summary = world["summary"]["tasks"]["digits"]
    assert sum(c["selected"] for c in summary["per_class"].values()) == BUDGET
    assert {c: v["selected"] for c, v in summary["per_class"].items()} == {
        c: sum(r["cls"] == c for r in digits) for c in summary["per_class"]
    }


def test_leakage_guard_keeps_copies_of_val_images_out(world):
    sel = world["sel"]
    summary = world["summary"]["tasks"]["digits"]
    leakage = summary["leakage"]
    assert leakage["enabled"] and leakage["threshold"] == 0.97 and leakage["heldout_images"] == 20
    with open(os.path.join(sel, "tasks", "digits", "leakage.jsonl")) as f:
        leaked = [json.loads(line) for line in f]
    assert leakage["pool_matches"] == len(leaked)
    planted = [r for r in leaked if r["position"] in (0, 1) and r["source_index"] == 4]  # the leak shard is listed 5th
    assert len(planted) == 2 and all(r["similarity"] >= 0.999 for r in planted)
    for task in ("digits", "gradients"):
        assert not {r["key"] for r in _manifest(sel, task)} & set(LEAK_KEYS)


def test_task_subset_loader_reads_exactly_the_tasks_samples(world):
    sel = world["sel"]
    subset = load_task_subset(sel, "gradients")
    got = {s.key: s.members for s in iter_task_samples(subset)}
    rows = _manifest(sel, "gradients")
    assert set(got) == {r["key"] for r in rows}
    sources = {}
    for shard in {r["source_shard"] for r in rows}:
        sources.update({(shard, s.key): s.members for s in iter_samples(shard)})
    for r in rows:
        assert got[r["key"]] == sources[(r["source_shard"], r["key"])], "members copied byte for byte"
        assert set(got[r["key"]]) >= {"jpg", "json"}
    assert len(open_task_data(os.path.join(sel, "tasks", "gradients"))) == BUDGET
    # What trainers read instead of the manifest: the same rows, sorted by shared shard and key.
    samples = TaskSamples.open(os.path.join(sel, "tasks", "gradients"))
    from_arrays = [
        (name, k.decode(), int(i)) for s, name in enumerate(samples.shards) for k, i in zip(*samples.rows(s))
    ]
    assert from_arrays == sorted((r["shard"], r["key"], int(r["id"])) for r in rows)


def test_report_shows_both_tasks_with_their_precision(world, tmp_path):
    from sept.data.report import ReportConfig, write_report

    out = str(tmp_path / "report")
    result = write_report(
        ReportConfig(
            selection=world["sel"],
            out=out,
            truth=world["corpus"].truth_path,
            domain=["digits=digits", "gradients=gradients"],
            samples=3,
            top=4,
        )
    )
    truth = world["truth"]
    for task in ("digits", "gradients"):
        got = result["tasks"][task]["precision"]["overall"]
        assert got == pytest.approx(np.mean([truth.get(r["key"]) == task for r in _manifest(world["sel"], task)]))
        for name in result["tasks"][task]["files"].values():
            assert name and os.path.getsize(os.path.join(out, name)) > 1000
    page = Path(os.path.join(out, "index.html")).read_text()
    assert "Task digits" in page and "Task gradients" in page and "Shared shards" in page


def test_cluster_strategy_with_class_balance_and_near_duplicates(world, ray_cluster, tmp_path):
    from sept.cluster.select import select
    from sept.cluster.select_config import SelectConfig

    out = str(tmp_path / "sel_cluster")
    summary = select(
        SelectConfig(
            index=world["index"],
            encoder=world["encoder"],
            target=world["corpus"].target_dir,
            task="digits",
            budget=BUDGET,
            out=out,
            strategy="cluster",
            balance="class",
            clusters=12,
            near_dup_threshold=0.99,
            ray_address=ray_cluster.address,
        )
    )
    task = summary["tasks"]["digits"]
    rows = _manifest(out, "digits")
    assert len(rows) == task["selected"] == BUDGET and len({r["key"] for r in rows}) == BUDGET
    assert task["clusters"] == 12 and 1 <= task["clusters_kept"] <= 12
    assert task["duplicates"]["near_dup_threshold"] == 0.99
    assert not {r["key"] for r in rows} & set(LEAK_KEYS), "the leakage guard holds for every strategy"
    assert sum(c["selected"] for c in task["per_class"].values()) == BUDGET
    assert all(r["chosen_by"] in r["retrieved_by"] for r in rows)


def test_search_strategy_near_duplicates_keep_no_two_samples_that_close(world, ray_cluster, tmp_path):
    """The default strategy with --near-dup-threshold: no two chosen samples are that similar."""
    from sept.cluster.select import select
    from sept.cluster.select_config import SelectConfig
    from sept.index.embedding_store import EmbeddingStore
    from sept.index.store import IndexStore
    from sept.index.vector_lookup import fetch_vector_array

    out = str(tmp_path / "sel_near_dup")
    threshold = 0.97
    summary = select(
        SelectConfig(
            index=world["index"],
            encoder=world["encoder"],
            target=world["corpus"].target_dir,
            task="digits",
            budget=BUDGET,
            out=out,
            near_dup_threshold=threshold,
            ray_address=ray_cluster.address,
        )
    )
    task = summary["tasks"]["digits"]
    rows = _manifest(out, "digits")
    assert len(rows) == task["selected"] > 0 and task["duplicates"]["near_duplicates_dropped"] > 0
    emb = EmbeddingStore.open(IndexStore.open(world["index"]).attrs["embeddings"]["path"])
    ids, x = fetch_vector_array(emb, np.asarray([r["id"] for r in rows], np.int64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    assert len(ids) == len(rows) and sims.max() < threshold


def test_rerun_of_the_same_command_reproduces_every_byte(world, ray_cluster, tmp_path):
    other = str(tmp_path / "sel2")
    ray_cluster.run_sept("select", *world["two_tasks"], "--out", other)
    assert _tree_digest(other) == world["first_run"]
    # and rerunning into the same folder is a no-op that changes nothing
    again = ray_cluster.run_sept("select", *world["two_tasks"], "--out", other)
    assert json.loads(again.stdout[again.stdout.index("{") :])["copied"] == 0
    assert _tree_digest(other) == world["first_run"]


def test_killed_run_resumes_without_duplicating_or_losing_a_sample(world, ray_cluster, tmp_path):
    out = str(tmp_path / "sel_killed")
    args = [
        os.path.join(VENV_BIN, "sept"),
        "select",
        *world["two_tasks"],
        "--out",
        out,
        "--ray-address",
        ray_cluster.address,
    ]
    proc = subprocess.Popen(
        args, env=ray_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    shards = os.path.join(out, "shards")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # the first sign of copying: a job's folder
        if os.path.isdir(shards) and any(is_staging_name(n) or n.startswith("part-") for n in os.listdir(shards)):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-materialization, without cleaning up
    proc.wait()
    ray_cluster.run_sept("select", *world["two_tasks"], "--out", out)
    keys = _shard_keys(out)
    assert len(keys) == len(set(keys)), "no sample held twice"
    assert _tree_digest(out) == world["first_run"], "the resumed run ends exactly where an uninterrupted one does"


def test_resume_cleans_what_a_crash_leaves_and_redoes_unfinished_jobs(world, ray_cluster, tmp_path):
    """The states a crash can leave, made on purpose: a job whose parts were renamed into place but
    whose marker was not written, a job folder half written, and a task chosen but not yet listed."""
    import shutil

    out = str(tmp_path / "sel_crashed")
    shutil.copytree(world["sel"], out)
    catalog = os.path.join(out, "shards", ".catalog")
    marker = os.path.join(catalog, sorted(os.listdir(catalog))[0])
    with open(marker) as f:
        job = json.load(f)
    os.remove(marker)  # its parts stay: orphans that no marker names
    part = sorted(job["parts"])[0]
    half = os.path.join(out, "shards", f".{job['job']}.deadbeef.tmp")
    os.makedirs(half)
    with open(os.path.join(half, part), "wb") as f:  # another attempt, cut mid-write
        f.write(Path(os.path.join(out, "shards", part)).read_bytes()[:1500])
    with open(os.path.join(out, "shards", part), "r+b") as f:  # and the orphan itself damaged
        f.truncate(2048)
    os.remove(os.path.join(out, "tasks", "digits", "manifest.jsonl"))
    ray_cluster.run_sept("select", *world["two_tasks"], "--out", out)
    keys = _shard_keys(out)
    assert len(keys) == len(set(keys)), "no sample held twice"
    assert _tree_digest(out) == world["first_run"], "the resumed run ends exactly where an uninterrupted one does"


def test_adding_a_task_later_copies_only_its_new_samples(world, ray_cluster, tmp_path):
    import shutil

    sel = str(tmp_path / "sel_grow")
    shutil.copytree(world["sel"], sel)
    before = {
        n: os.stat(os.path.join(sel, "shards", n)).st_mtime_ns
        for n in os.listdir(os.path.join(sel, "shards"))
        if n.endswith(".tar")
    }
    old_union = {r["id"] for t in ("digits", "gradients") for r in _manifest(sel, t)}
    proc = ray_cluster.run_sept(
        "select",
        "--index",
        world["index"],
        "--encoder",
        world["encoder"],
        "--target",
        world["corpus"].target_dir,
        "--task",
        "digits-big",
        "--budget",
        str(2 * BUDGET),
        "--out",
        sel,
    )
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    big = _manifest(sel, "digits-big")
    new = {r["id"] for r in big} - old_union
    assert len(big) == 2 * BUDGET and new and summary["copied"] == len(new)
    after = {n for n in os.listdir(os.path.join(sel, "shards")) if n.endswith(".tar")}
    for name, mtime in before.items():
        assert os.stat(os.path.join(sel, "shards", name)).st_mtime_ns == mtime, f"{name} was rewritten"
    new_parts = after - set(before)
    new_keys = [s.key for n in new_parts for s in iter_samples(os.path.join(sel, "shards", n))]
    assert sorted(new_keys) == sorted(r["key"] for r in big if r["id"] in new)
    # the earlier tasks are untouched and still load
    assert _manifest(sel, "digits") == _manifest(world["sel"], "digits")
    assert len(load_task_subset(sel, "digits")) == BUDGET


def test_changed_or_missing_shard_is_named(world, tmp_path):
    import shutil

    sel = str(tmp_path / "sel_broken")
    shutil.copytree(world["sel"], sel)
    rows = _manifest(sel, "digits")
    victim = os.path.join(sel, "shards", rows[0]["shard"])
    with open(victim, "r+b") as f:  # same size, one byte different: only the hash can tell
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    load_task_subset(sel, "digits", verify="size")
    with pytest.raises(SeptError, match=rows[0]["shard"] + ".*changed"):
        load_task_subset(sel, "digits")
    os.remove(victim)
    with pytest.raises(SeptError, match=rows[0]["shard"] + " is missing"):
        load_task_subset(sel, "digits", verify="size")


def _error_line(capsys, *args: str) -> str:
    """Run `sept ARGS` in this process (bad input fails before any Ray work): exit 2, one error line."""
    from sept.cli import main

    capsys.readouterr()
    assert main(list(args)) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_gets_one_clear_line(world, tmp_path, capsys):
    base = ["select", "--index", world["index"], "--encoder", world["encoder"]]
    target = world["corpus"].target_dir
    out = str(tmp_path / "s")
    line = _error_line(
        capsys,
        *base,
        "--target",
        target,
        "--target",
        world["gradients"],
        "--task",
        "x",
        "--task",
        "x",
        "--budget",
        "5",
        "--out",
        out,
    )
    assert "'x'" in line and "twice" in line
    assert "budget 0" in _error_line(capsys, *base, "--target", target, "--budget", "0", "--out", out)
    assert "483" in _error_line(capsys, *base, "--target", target, "--budget", "483", "--out", out)
    # a class with no images
    empty_class = tmp_path / "t" / "train" / "b"
    empty_class.mkdir(parents=True)
    (tmp_path / "t" / "train" / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "t" / "train" / "a" / "0.png")
    assert str(empty_class) in _error_line(
        capsys, *base, "--target", str(tmp_path / "t"), "--budget", "5", "--out", out
    )
    # a task file naming a task twice
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        f"budget: 5\ntasks:\n  - {{name: a, target: {target}}}\n  - {{name: a, target: {world['gradients']}}}\n"
    )
    assert "twice" in _error_line(capsys, *base, "--tasks", str(tasks), "--out", out)
    # a selection folder holding this task selected differently is never overwritten
    line = _error_line(
        capsys, *base, "--target", target, "--task", "digits", "--budget", str(BUDGET + 1), "--out", world["sel"]
    )
    assert world["sel"] in line and "budget" in line
    assert not os.path.exists(out), "nothing is written for bad input"


def test_pretraining_reads_one_tasks_subset_of_the_shared_shards(world, tmp_path):
    """`sept pretrain --data SEL/tasks/TASK`: two ranks split exactly the task's samples, and a
    short training run on the task folder reads nothing but them."""
    import csv

    from sept.data.identity import make_ids
    from sept.training.augment import ViewAugment
    from sept.training.config import load_config
    from sept.training.loader import PretrainStream
    from sept.training.trainer import train

    sel = world["sel"]
    folder = os.path.join(sel, "tasks", "gradients")
    subset = open_task_data(folder)
    wanted = {r["key"] for r in _manifest(sel, "gradients")}
    other = {r["key"] for r in _manifest(sel, "digits")} - wanted
    assert other, "the other task adds samples to the shared shards that this task must not read"
    seen = []
    for rank in range(2):
        stream = PretrainStream(
            subset.shards,
            augment=ViewAugment(16),
            batch_size=4,
            rank=rank,
            world_size=2,
            keys=subset.samples,
            shard_counts=subset.samples.counts.tolist(),
        )
        assert stream.num_samples == BUDGET and stream.batches_per_epoch == BUDGET // 2 // 4
        seen.append([k for batch in stream.epoch(0) for k in batch.keys])
    assert len(seen[0]) == len(seen[1]) == BUDGET // 2
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) <= wanted
    assert len(set(seen[0]) | set(seen[1])) == BUDGET

    cfg = load_config(
        None,
        dict(
            data=folder,
            out=str(tmp_path / "run"),
            steps=3,
            batch_size=8,
            image_size=16,
            width=4,
            sample_log=True,
            log_every=1,
        ),
    )
    train(cfg, distributed_run=False)
    with open(tmp_path / "run" / "samples-rank0.csv") as f:
        logged_rows = list(csv.DictReader(f))
    logged = [int(i) for row in logged_rows for i in row["ids"].split()]
    logged_pool = [int(i) for row in logged_rows for i in row["pool_ids"].split()]
    # Ids are the samples' places in the shared shards (listing index, position), never the pool's;
    # beside each, its pool id: the manifest's id of that (shared shard, key).
    place_of = {}
    for index, shard in enumerate(subset.shards):
        for s in iter_samples(shard):
            if s.key in subset.samples[index]:
                place_of[int(make_ids(index, [s.position])[0])] = (os.path.basename(shard), s.key)
    manifest_id = {(r["shard"], r["key"]): int(r["id"]) for r in _manifest(sel, "gradients")}
    assert len(set(logged)) == 24 and set(logged) <= set(place_of)
    assert logged_pool == [manifest_id[place_of[i]] for i in logged]
    assert set(logged_pool) != set(logged)  # the two id spaces differ here, so the join is tested


def test_detcon_masks_are_made_once_beside_the_selection_and_reused_by_other_tasks(world, tmp_path, caplog):
    import shutil

    from sept.training.config import load_config
    from sept.training.trainer import train

    sel = str(tmp_path / "sel")
    shutil.copytree(world["sel"], sel)

    def detcon_run(task: str, out: str) -> None:
        cfg = load_config(
            None,
            dict(
                data=os.path.join(sel, "tasks", task),
                out=str(tmp_path / out),
                method="detcon",
                steps=2,
                batch_size=8,
                image_size=16,
                width=4,
            ),
        )
        train(cfg, distributed_run=False)

    caplog.set_level("INFO", logger="sept.data.masks")
    detcon_run("gradients", "run-a")
    masks = os.path.join(sel, "masks")
    first = {n: os.stat(os.path.join(masks, n)).st_mtime_ns for n in os.listdir(masks)}
    made = [line for line in caplog.text.splitlines() if "masks for" in line]
    assert sorted(first) == sorted({r["shard"] for r in _manifest(sel, "gradients")}) and len(made) == len(first)
    assert not (tmp_path / "run-a" / "masked-shards").exists()
    caplog.clear()
    detcon_run("digits", "run-b")  # the other task: only the shards the first did not use are segmented
    digits_shards = {r["shard"] for r in _manifest(sel, "digits")}
    made = [line for line in caplog.text.splitlines() if "masks for" in line]
    assert len(made) == len(digits_shards - set(first))
    assert {n: os.stat(os.path.join(masks, n)).st_mtime_ns for n in first} == first  # reused, not redone
    assert set(os.listdir(masks)) == set(first) | digits_shards


def _two_tasks_config(world, out: str, ray_cluster, **kwargs):
    from sept.cluster.select_config import SelectConfig

    return SelectConfig(
        index=world["index"],
        encoder=world["encoder"],
        target=[world["corpus"].target_dir, world["gradients"]],
        task=["digits", "gradients"],
        budget=BUDGET,
        out=out,
        ray_address=ray_cluster.address,
        **kwargs,
    )


def test_cluster_strategy_with_two_tasks_and_a_leakage_retry(world, ray_cluster, tmp_path, monkeypatch, caplog):
    """A leakage search that must go round again, under the cluster strategy, with two tasks: the
    second round still searches through the searcher pool (it once found that name rebound)."""
    import logging

    import sept.cluster.select as select_module

    # One neighbour per held-out image: the planted copies of digits' val images fill it above the
    # threshold, so the guard cannot know it has seen them all and must search again.
    monkeypatch.setattr(select_module, "LEAK_NEIGHBOURS", 1)
    caplog.set_level(logging.INFO, logger="sept.cluster.select")
    out = str(tmp_path / "sel")
    summary = select_module.select(_two_tasks_config(world, out, ray_cluster, strategy="cluster", clusters=12))
    searches = [int(m) for m in re.findall(r"chosen with (\d+) search", caplog.text)]
    assert searches and searches[-1] >= 2, "the leakage guard searched again"
    # Going round again changes how the leaked ids are found, not which: the same selection as
    # the guard's first look at 32 neighbours gives.
    monkeypatch.undo()
    reference = str(tmp_path / "reference")
    select_module.select(_two_tasks_config(world, reference, ray_cluster, strategy="cluster", clusters=12))
    for name in ("digits", "gradients"):
        rows = _manifest(out, name)
        assert len(rows) == summary["tasks"][name]["selected"] > 0
        assert not {r["key"] for r in rows} & set(LEAK_KEYS)
        assert [r["id"] for r in rows] == [r["id"] for r in _manifest(reference, name)]


def test_a_task_that_needs_more_neighbours_searches_again_with_a_larger_k(
    world, ray_cluster, tmp_path, monkeypatch, caplog
):
    """The k named in "searching again with k=N" is the k of the next search, and larger than the
    k already searched (which, with two tasks, may be another task's larger k)."""
    import logging

    import sept.cluster.select as select_module

    monkeypatch.setattr(select_module, "neighbours_needed", lambda budget, queries, ntotal: 1)
    caplog.set_level(logging.INFO, logger="sept.cluster.select")
    out = str(tmp_path / "sel")
    summary = select_module.select(_two_tasks_config(world, out, ray_cluster))
    searched = [int(k) for k in re.findall(r"searched \d+ queries of \d+ task\(s\), k=(\d+)", caplog.text)]
    again = re.findall(
        r"more than the (\d+) neighbours per target image searched; searching again with k=(\d+)", caplog.text
    )
    assert again, "k=1 cannot fill a budget of 40 from a few images per class"
    for before, after in again:
        assert int(after) > int(before) and int(before) in searched and int(after) in searched
    for name in ("digits", "gradients"):
        assert summary["tasks"][name]["selected"] == BUDGET


def test_pretrain_command_takes_a_task_folder_or_a_selection_with_task(world, tmp_path):
    """`sept pretrain --data SEL/tasks/TASK` (the README's example) and `--data SEL --task TASK` both
    train on the task's samples; a selection of two tasks without --task is one clear line."""
    from conftest import run_sept

    sel = world["sel"]
    flags = ["--steps", "2", "--batch-size", "8", "--config", str(_tiny_config(tmp_path))]
    for name, data in (
        ("folder", ["--data", os.path.join(sel, "tasks", "gradients")]),
        ("task", ["--data", sel, "--task", "gradients"]),
    ):
        run_dir = tmp_path / name
        run_sept("pretrain", *data, "--out", str(run_dir), *flags)
        assert (run_dir / "encoder.pt").is_file()
        with open(run_dir / "config.yaml") as f:
            assert os.path.join(sel, "tasks", "gradients") in f.read()
    proc = run_sept("pretrain", "--data", sel, "--out", str(tmp_path / "x"), *flags, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert sel in line and "digits" in line and "gradients" in line and "--task" in line
    proc = run_sept("pretrain", "--data", sel, "--task", "nope", "--out", str(tmp_path / "y"), *flags, check=False)
    assert proc.returncode == 2 and "'nope'" in proc.stderr


def _tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("image_size: 16\nwidth: 4\nlog_every: 1\n")
    return str(path)


def test_each_class_is_searched_with_k_from_its_own_share_of_the_budget():
    """With class balance a class of one image needs 2 x its whole share; a class of 50 images
    needs 2 x a fiftieth of it: the small class no longer sets k for every image."""
    from sept.cluster.select import _neighbours_per_image
    from sept.cluster.task_record import SelectionTask
    from sept.data.task_list import TaskSpec
    from sept.index.budget import round_k

    query_class = np.array([0] * 50 + [1])
    task = SelectionTask(
        spec=TaskSpec(name="t", target="/t", budget=1000),
        classes=["many", "one"],
        query_refs=[],
        query_names=[],
        query_class=query_class,
        heldout_refs=[],
    )
    k = _neighbours_per_image(task, "class", ntotal=10**6)
    assert k[-1] == round_k(1000, 10**6) == 1024 and set(k[:50].tolist()) == {round_k(20, 10**6)} == {20}
    assert set(_neighbours_per_image(task, "instance", ntotal=10**6).tolist()) == {round_k(40, 10**6)}
    assert _neighbours_per_image(task, "class", ntotal=300)[-1] == 300  # never more than the pool
