"""sept dedup: the rules on small arrays, the table, and the command on the real two-node Ray cluster,
on planted copies in a synthetic store (a killed run resumed) and in a real-image pool that `sept
select` then draws from."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import VENV_BIN
from PIL import Image

from sept.data.identity import make_ids
from sept.errors import SeptError
from sept.index.dedup_table import EXACT, NEAR, DedupTable
from sept.index.embedding_store import EmbeddingStore, EncoderIdentity
from sept.index.pool_dedup import exact_copies, near_copies, resolve_border
from sept.index.strategies import Stream, fill

# ---- the rules ---------------------------------------------------------------------------------


def test_exact_copies_keep_the_first_in_pool_order():
    ids = np.array([40, 10, 30, 20, 50], np.int64)
    hashes = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [3, 5]], np.uint64)
    removed, kept = exact_copies(ids, hashes)
    assert dict(zip(removed.tolist(), kept.tolist())) == {20: 10, 40: 10}


def test_exact_copies_need_both_hash_words_equal():
    removed, _ = exact_copies(np.array([1, 2]), np.array([[7, 1], [7, 2]], np.uint64))
    assert len(removed) == 0


def _unit(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([np.cos(a), np.sin(a), 0.0], np.float32)


def test_near_rule_keeps_the_member_nearest_the_centroid_and_never_chains():
    # a, b, c on an arc 10 degrees apart: a~b and b~c pass cos(12 deg), a~c does not.
    x = np.stack([_unit(0), _unit(10), _unit(20), _unit(90)])
    ids = np.array([1, 2, 3, 4])
    t = float(np.cos(np.deg2rad(12)))
    # b is nearest the centroid: it stands for both a and c, each directly similar to it.
    found = near_copies(ids, x, np.zeros(4, int), np.array([0.5, 0.9, 0.5, 0.1]), t)
    removed, kept, sims = found.removed, found.kept, found.similarity
    assert dict(zip(removed.tolist(), kept.tolist())) == {1: 2, 3: 2}
    assert np.all(sims >= t)
    # a first: b goes as a's copy; c's only close partner is gone, so c stays (no chain a-b-c).
    found = near_copies(ids, x, np.zeros(4, int), np.array([0.9, 0.5, 0.1, 0.1]), t)
    removed, kept = found.removed, found.kept
    assert dict(zip(removed.tolist(), kept.tolist())) == {2: 1}


def test_near_rule_compares_within_a_cluster_only():
    x = np.stack([_unit(0), _unit(1)])
    assert len(near_copies(np.array([1, 2]), x, np.array([0, 1]), np.ones(2), 0.99).removed) == 0
    found = near_copies(np.array([1, 2]), x, np.array([5, 5]), np.ones(2), 0.99)
    assert found.removed.tolist() == [2]  # equal centroid similarity: the smaller id is visited first


def test_a_pair_split_by_a_cluster_border_is_found_through_a_guest():
    # 1 and 2 are copies in clusters 0 and 1; 2 also visits cluster 0 as a guest, where 3 stands for 4.
    x = np.stack([_unit(0), _unit(1), _unit(1), _unit(40), _unit(40.5)])
    ids, cluster = np.array([1, 2, 2, 3, 4]), np.array([0, 1, 0, 0, 0])
    guest = np.array([False, False, True, False, False])
    found = near_copies(ids, x, cluster, np.array([0.9, 0.9, 0.8, 0.7, 0.6]), 0.99, guest)
    assert found.removed.tolist() == [4]  # a guest is never removed in the cluster it visits
    a, b, s = found.border
    assert (a.tolist(), b.tolist()) == ([2], [1]) and s[0] >= 0.99
    removed, kept, _ = resolve_border(a, b, s, gone=found.removed, standing=found.kept)
    assert dict(zip(removed.tolist(), kept.tolist())) == {2: 1}  # the later in pool order goes
    removed, kept, _ = resolve_border(a, b, s, gone=found.removed, standing=np.array([2]))
    assert dict(zip(removed.tolist(), kept.tolist())) == {1: 2}  # unless it stands for others
    assert len(resolve_border(a, b, s, gone=np.array([1]), standing=found.kept)[0]) == 0


def test_near_rule_in_a_large_cluster_matches_the_dense_one(monkeypatch):
    import sept.index.pool_dedup as pool_dedup

    rng = np.random.default_rng(3)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    x = np.concatenate([base, base[:60] + 0.01 * rng.normal(size=(60, 16)).astype(np.float32)])
    ids = np.arange(len(x))
    args = (ids, x, np.zeros(len(x), int), rng.random(len(x)).astype(np.float32), 0.99)
    dense = near_copies(*args)
    monkeypatch.setattr(pool_dedup, "DENSE_MEMBERS", 10)  # the range-search path
    sparse = near_copies(*args)
    assert len(dense.removed) == 60
    for a, b in ((dense.removed, sparse.removed), (dense.kept, sparse.kept), (dense.similarity, sparse.similarity)):
        np.testing.assert_allclose(np.sort(a), np.sort(b), rtol=1e-5)


def test_assignment_through_an_ivf_over_many_centroids_mostly_agrees_with_the_flat_one(monkeypatch):
    import sept.index.pool_dedup as pool_dedup

    rng = np.random.default_rng(5)
    centroids = pool_dedup.normalize(rng.normal(size=(400, 16)).astype(np.float32))
    x = centroids[rng.integers(400, size=3000)] + 0.1 * rng.normal(size=(3000, 16)).astype(np.float32)
    flat, _ = pool_dedup.assign(x, centroids)
    monkeypatch.setattr(pool_dedup, "IVF_ASSIGN_FROM", 100)
    ivf, sims = pool_dedup.assign(x, centroids)
    assert np.mean(ivf == flat) > 0.95
    np.testing.assert_allclose(sims, np.sum(pool_dedup.normalize(x) * centroids[ivf], axis=1), atol=1e-5)


def test_table_answers_membership_and_group_sizes(tmp_path):
    store = _store(str(tmp_path / "emb.zarr"), shards=1, per_shard=4)
    table = DedupTable(
        np.array([9, 3]), np.array([1, 1]), np.array([NEAR, EXACT]), np.array([0.97, 1.0]), dict(fingerprint="f1")
    )
    table.write(store.path)
    back = DedupTable.read(store.path, fingerprint="f1")
    assert back.removed.tolist() == [3, 9] and back.kept.tolist() == [1, 1]
    assert back.is_removed(np.array([[3, 4], [9, 1]])).tolist() == [[True, False], [True, False]]
    assert back.stands_for(np.array([1, 2, 3])).tolist() == [2, 0, 0]
    assert back.summary() == dict(removed=2, exact=1, near=1, representatives=1)
    with pytest.raises(SeptError, match="other embeddings.*sept dedup --embeddings"):
        DedupTable.read(store.path, fingerprint="f2")
    assert DedupTable.read(str(tmp_path / "nothing")) is None


def test_fill_skips_removed_ids_and_counts_them():
    stream = Stream.from_arrays(
        np.array([5, 6, 7, 8]), np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.zeros(4, np.int64)
    )
    choice = fill([stream], 2, removed=np.array([6, 99]))
    assert choice.ids.tolist() == [5, 7] and choice.dedup_skipped == 1


# ---- the command ---------------------------------------------------------------------------------


def _store(path: str, *, shards: int, per_shard: int, dim: int = 16, seed: int = 0):
    """A store of random unit-ish vectors with random hashes; the caller plants copies."""
    rng = np.random.default_rng(seed)
    store = EmbeddingStore.create_or_open(
        path, encoder=EncoderIdentity("synthetic", "none", dim, 32), pool=[f"/pool/{i:05d}.tar" for i in range(shards)]
    )
    store.x = rng.normal(size=(shards, per_shard, dim)).astype(np.float32)
    store.h = rng.integers(0, 2**63, size=(shards, per_shard, 2)).astype(np.uint64)
    return store


def _planted_store(path: str) -> tuple[EmbeddingStore, dict, dict]:
    """30 shards of 100: shard 29 holds 20 exact copies (same bytes hash, same vector) and 20 near
    copies (a little noise, other bytes) of distinct samples of the other shards."""
    shards, per = 30, 100
    store = _store(path, shards=shards, per_shard=per, dim=16, seed=1)
    rng = np.random.default_rng(2)
    sources = rng.choice((shards - 1) * per, 40, replace=False)
    exact, near = {}, {}
    for r, src in enumerate(sources):
        s, p = divmod(int(src), per)
        copy_id = int(make_ids(shards - 1, [r])[0])
        store.x[shards - 1, r] = store.x[s, p]
        if r < 20:
            store.h[shards - 1, r] = store.h[s, p]
            exact[copy_id] = int(make_ids(s, [p])[0])
        else:
            store.x[shards - 1, r] += 0.02 * rng.normal(size=16).astype(np.float32)
            near[copy_id] = int(make_ids(s, [p])[0])
    for i in range(shards):
        store.write_shard(i, store.x[i], make_ids(i, range(per)), hashes=store.h[i])
    return store, exact, near


def _sept_popen(ray_cluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [os.path.join(VENV_BIN, "sept"), *args, "--ray-address", ray_cluster.address],
        env=ray_cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_dedup_removes_planted_copies_and_a_killed_run_redoes_only_unfinished_tasks(tmp_path, ray_cluster):
    store, exact, near = _planted_store(str(tmp_path / "emb.zarr"))
    args = ["dedup", "--embeddings", store.path, "--bucket-rows", "800", "--cluster-size", "100"]
    proc = _sept_popen(ray_cluster, *args)
    maps = os.path.join(store.path, "dedup-work", "map")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = [n for n in os.listdir(maps) if n.isdigit()] if os.path.isdir(maps) else []
        if len(done) >= 3:
            break
        time.sleep(0.01)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert running, "the run finished before it could be killed: " + err[-2000:]
    done_at_kill = len([n for n in os.listdir(maps) if n.isdigit()])
    assert 3 <= done_at_kill and not os.path.exists(os.path.join(store.path, "dedup", "zarr.json"))

    rerun = ray_cluster.run_sept(*args)
    skipped = re.search(r"map: (\d+) of 30 tasks already done", rerun.stderr)
    assert skipped and int(skipped.group(1)) >= done_at_kill, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{") :])
    table = DedupTable.read(store.path)
    got = dict(zip(table.removed.tolist(), table.kept.tolist()))
    reasons = dict(zip(table.removed.tolist(), table.reason.tolist()))
    # every exact copy goes, standing on its original, by reason of equal bytes
    assert all(got.get(c) == o and reasons[c] == EXACT for c, o in exact.items())
    # near copies: one of each pair goes (which one is the centroid rule's choice), nothing else goes
    found = sum(got.get(c) == o or got.get(o) == c for c, o in near.items())
    assert found >= 19, f"{found} of 20 near pairs found"
    planted = set(exact) | set(near) | set(near.values())
    assert set(got) <= planted
    assert summary["exact"] == 20 and summary["removed"] == len(got)
    assert np.all(table.similarity[table.reason == NEAR] >= 0.96)
    assert not os.path.exists(os.path.join(store.path, "dedup-work"))
    # the same command again finds the table and does nothing
    again = ray_cluster.run_sept(*args)
    assert "already holds the table" in again.stderr


def test_a_store_without_content_hashes_is_named(tmp_path, ray_cluster):
    store = _store(str(tmp_path / "emb.zarr"), shards=2, per_shard=10)
    store.write_shard(0, store.x[0], make_ids(0, range(10)), hashes=store.h[0])
    store.write_shard(1, store.x[1], make_ids(1, range(10)))
    proc = ray_cluster.run_sept("dedup", "--embeddings", store.path, check=False)
    assert proc.returncode == 2
    assert re.search(r"embeddings shard 00001 \(/pool/00001.tar\) has no content hashes", proc.stderr), proc.stderr


# ---- real images: planted copies in the demo pool, then sept select ------------------------------


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _copy_shard(path: str, originals: list[tuple[str, bytes]]) -> dict[str, str]:
    """A pool shard of copies: the first half byte-identical, the rest re-encoded (JPEG q40, 0.8x), as
    the issue measured them.
    Returns copy key -> original key."""
    import webdataset as wds

    half = len(originals) // 2
    pairs = {}
    with wds.TarWriter(path) as sink:
        for i, (key, data) in enumerate(originals):
            if i >= half:
                image = Image.open(io.BytesIO(data)).convert("RGB")
                image = image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.BILINEAR)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=40)
                data = buf.getvalue()
            copy = f"copy{i:04d}"
            sink.write({"__key__": copy, "jpg": data, "json": json.dumps({"key": copy}).encode()})
            pairs[copy] = key
    return pairs


def test_select_skips_what_dedup_removed_and_marks_who_stands_for_copies(tmp_path, ray_cluster):
    from test_select_tasks import make_edge_encoder

    from sept.data.decode import decode_image
    from sept.data.demo_corpus import make_demo_corpus
    from sept.data.samples import iter_samples
    from sept.data.shards import list_shards

    corpus = make_demo_corpus(
        str(tmp_path / "corpus"), pool_size=240, shards=2, target_train_per_class=3, target_val_per_class=1, seed=4
    )
    truth = corpus.truth()
    samples = [s for shard in list_shards(corpus.pool_spec) for s in iter_samples(shard)]
    digits = [(s.key, s.members["jpg"]) for s in samples if truth[s.key] == "digits"][:24]
    pairs = _copy_shard(str(tmp_path / "copies.tar"), digits)
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(list_shards(corpus.pool_spec) + [str(tmp_path / "copies.tar")]) + "\n")
    encoder = make_edge_encoder(str(tmp_path / "enc.pt"), [decode_image(s.members["jpg"]) for s in samples[::2]])
    emb, index = str(tmp_path / "emb.zarr"), str(tmp_path / "index.zarr")
    ray_cluster.run_sept("embed", "--pool", str(pool), "--encoder", encoder, "--out", emb, "--batch-size", "64")
    ray_cluster.run_sept("index", "--embeddings", emb, "--out", index, "--shards", "2", "--factory", "Flat")
    # This untrained edge encoder puts re-encoded copies (0.96-0.98) among distinct digits (up to
    # 0.97): near copies are for a real encoder (benchmarks/dedup_quality.py); exact ones are not.
    ray_cluster.run_sept("dedup", "--embeddings", emb, "--threshold", "0.999")
    table = DedupTable.read(emb)
    key_of = {}
    for i, shard in enumerate(list_shards(str(pool))):
        for s in iter_samples(shard):
            key_of[int(make_ids(i, [s.position])[0])] = s.key
    removed = {key_of[i] for i in table.removed.tolist()}
    exact_pairs = {c: o for j, (c, o) in enumerate(pairs.items()) if j < len(pairs) // 2}
    assert set(exact_pairs) <= removed  # byte-identical copies always go, the original stays
    assert not removed & set(exact_pairs.values())

    select = ["select", "--index", index, "--encoder", encoder, "--target", corpus.target_dir, "--budget", "120"]
    ray_cluster.run_sept(*select, "--out", str(tmp_path / "sel"))
    manifest = _jsonl(tmp_path / "sel" / "tasks" / "target" / "manifest.jsonl")
    chosen = {row["key"] for row in manifest}
    assert not chosen & removed
    stands = {row["key"]: row["stands_for"] for row in manifest if "stands_for" in row}
    assert stands and set(stands) <= set(exact_pairs.values())
    task = json.loads((tmp_path / "sel" / "tasks" / "target" / "task.json").read_text())
    assert task["config"]["dedup"]["removed"] == len(table)
    # --no-dedup draws from the whole pool again: some copy and its original both get in
    ray_cluster.run_sept(*select, "--no-dedup", "--out", str(tmp_path / "sel-all"))
    everything = {row["key"] for row in _jsonl(tmp_path / "sel-all" / "tasks" / "target" / "manifest.jsonl")}
    assert any(c in everything and o in everything for c, o in exact_pairs.items())
