"""sept curate: the hierarchical k-means and balanced sampling on small in-memory mixtures (flatter than
random, exact water-filling, seeded, levels checked), the dedup hook on a hand-made store, and one run
end to end on the real two-node Ray cluster: an imbalanced demo pool curated flatter than a random
subset, a byte-identical rerun, dedup-removed ids left out, pre-training on the task and its report."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from conftest import run_sept

from sept.cluster.curate import CurateConfig, _assign_pool, _task_config, _training_sample, write_npz
from sept.data.identity import make_ids
from sept.errors import SeptError
from sept.index import hierarchical_kmeans as hk
from sept.index.dedup import normalize
from sept.index.dedup_table import NEAR, DedupTable
from sept.index.embedding_store import EmbeddingStore, EncoderIdentity

SHARES = (0.7, 0.2, 0.07, 0.03)


def mixture(n: int = 3000, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around four well-separated modes holding 70/20/7/3 % of the points, and each one's mode."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.normal(size=(len(SHARES), d)))
    mode = rng.choice(len(SHARES), size=n, p=SHARES)
    return normalize(centres[mode] + 0.15 * rng.normal(size=(n, d))), mode


def entropy(counts: np.ndarray) -> float:
    """Normalised entropy of a distribution over classes: 1 is even."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))


def curated(x: np.ndarray, n: int, seed: int = 0, **kwargs) -> np.ndarray:
    tree = hk.hierarchical_kmeans(x, hk.default_levels(len(x)), seed=seed, progress=False, **kwargs)
    D, I = hk.assign(x, tree.centroids[0])
    return hk.balanced_sample(I, tree, n, distances=D, seed=seed)


def test_balanced_sample_is_flatter_than_random_on_an_imbalanced_mixture():
    x, mode = mixture()
    rng = np.random.default_rng(0)
    for seed in range(3):
        chosen = curated(x, 400, seed=seed)
        assert len(chosen) == 400 and len(np.unique(chosen)) == 400
        ours = np.bincount(mode[chosen], minlength=4)
        rand = np.bincount(mode[rng.choice(len(x), 400, replace=False)], minlength=4)
        assert entropy(ours) > entropy(rand) + 0.1, (ours, rand)
        assert ours.max() / ours.min() < 0.5 * rand.max() / rand.min(), (ours, rand)


def test_water_fill_gives_exact_counts_as_level_as_they_can_be():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(hk.water_fill(np.array([1, 5, 10, 3]), 12, rng), [1, 4, 4, 3])
    np.testing.assert_array_equal(hk.water_fill(np.array([1, 5, 10, 3]), 100, rng), [1, 5, 10, 3])
    for _ in range(200):
        sizes = rng.integers(0, 30, size=int(rng.integers(1, 12)))
        n = int(rng.integers(0, 120))
        counts = hk.water_fill(sizes, n, rng)
        assert counts.sum() == min(n, sizes.sum()) and np.all(counts <= sizes) and np.all(counts >= 0)
        short = counts < sizes  # clusters that could give more sit at the top level, or one below it
        if short.any():
            assert counts[short].min() >= counts.max() - 1


def test_shares_are_water_filled_down_every_level():
    # level 1: six clusters (sizes 50, 1, 1, 2, 30, 30); level 2: {0, 1, 2} -> 0 and {3, 4, 5} -> 1
    tree = hk.Hierarchy(centroids=[np.zeros((6, 2)), np.zeros((2, 2))], parents=[np.array([0, 0, 0, 1, 1, 1])])
    level1 = np.repeat(np.arange(6), [50, 1, 1, 2, 30, 30])
    top, bottom = hk.quotas(level1, tree, 40, np.random.default_rng(0))[::-1]
    np.testing.assert_array_equal(top, [20, 20])
    np.testing.assert_array_equal(bottom, [18, 1, 1, 2, 9, 9])
    chosen = hk.balanced_sample(level1, tree, 40)
    np.testing.assert_array_equal(np.bincount(level1[chosen], minlength=6), bottom)
    closest = hk.balanced_sample(level1, tree, 40, distances=np.arange(len(level1))[::-1], sampling="closest")
    assert set(closest[level1[closest] == 0]) == set(range(50 - 18, 50)), "the 18 nearest of cluster 0"
    skipped = np.where(np.arange(len(level1)) % 2 == 0, level1, -1)  # every other point left out
    assert np.all(skipped[hk.balanced_sample(skipped, tree, 30)] >= 0)


def test_same_seed_same_tree_and_sample_another_seed_another_sample():
    x, _ = mixture(n=800)
    a = hk.hierarchical_kmeans(x, [40, 4], seed=1, progress=False)
    b = hk.hierarchical_kmeans(x, [40, 4], seed=1, progress=False)
    for ca, cb in zip(a.centroids, b.centroids):
        np.testing.assert_array_equal(ca, cb)
    np.testing.assert_array_equal(a.parents[0], b.parents[0])
    np.testing.assert_array_equal(curated(x, 100, seed=1), curated(x, 100, seed=1))
    assert not np.array_equal(curated(x, 100, seed=1), curated(x, 100, seed=2))


def test_levels_are_checked_and_defaults_sized_from_the_pool():
    assert hk.default_levels(290) == [29, 4]
    assert hk.default_levels(1_000_000) == [100_000, 14_285, 2040, 291]
    with pytest.raises(ValueError, match="--clusters: level 1 asks for 200 clusters of only 100 points"):
        hk.check_levels([200], 100)
    with pytest.raises(ValueError, match="level 2 asks for 20 clusters of only 10 level-1 centroids"):
        hk.check_levels([10, 20], 100)
    cfg = CurateConfig(embeddings="emb.zarr", size=10, out="sel", clusters=[5000, 50])
    with pytest.raises(SeptError, match="--clusters: level 1 asks for 5000 clusters of only 1200"):
        _task_config(cfg, 1200, None)
    cfg = CurateConfig(embeddings="emb.zarr", size=10, out="sel", sample_size=[3, 2, 1])
    with pytest.raises(SeptError, match="--sample-size gives 3 values for 2 levels"):
        _task_config(cfg, 1200, None)
    resolved = _task_config(CurateConfig(embeddings="emb.zarr", size=10, out="sel"), 1200, None)
    assert resolved["clusters"] == [120, 17] and resolved["sample_size"] == [5, 3] and resolved["train_size"] == 1200


def test_dedup_table_ids_are_left_out_of_training_and_assignment(tmp_path):
    from sept.cluster.index_build import embeddings_fingerprint

    x, _ = mixture(n=200, d=8)
    enc = EncoderIdentity(identity="enc", arch="resnet18_small", dim=8, image_size=32)
    store = EmbeddingStore.create_or_open(str(tmp_path / "emb.zarr"), encoder=enc, pool=["a.tar", "b.tar"])
    for s in range(2):
        store.write_shard(s, x[100 * s : 100 * (s + 1)], make_ids(s, range(100)))
    _, ids = store.read_all()
    removed = ids[::7]
    DedupTable(removed, ids[1::7], np.full(len(removed), NEAR), np.ones(len(removed)), {"fingerprint": "stale"}).write(
        store.path
    )
    with pytest.raises(SeptError, match="rerun `sept dedup"):
        DedupTable.read(store.path, fingerprint=embeddings_fingerprint(store))
    attrs = {"fingerprint": embeddings_fingerprint(store)}
    DedupTable(removed, ids[1::7], np.full(len(removed), NEAR), np.ones(len(removed)), attrs).write(store.path)
    table = DedupTable.read(store.path, fingerprint=embeddings_fingerprint(store))
    xs, train_ids = _training_sample(store, table, 150, seed=0)
    assert len(xs) == 150 and not np.isin(train_ids, removed).any()
    tree = hk.hierarchical_kmeans(xs, [10, 2], progress=False)
    level1, _, pool_ids, skipped = _assign_pool(store, table, tree, gpu=False)
    np.testing.assert_array_equal(pool_ids, ids)
    assert skipped == len(removed) and np.array_equal(level1 < 0, np.isin(ids, removed))
    level1, _, _, skipped = _assign_pool(store, None, tree, gpu=False)  # --no-dedup
    assert skipped == 0 and np.all(level1 >= 0)


def test_clusters_file_bytes_depend_only_on_the_arrays(tmp_path):
    arrays = dict(a=np.arange(5), b=np.ones((2, 3), np.float32))
    write_npz(str(tmp_path / "one.npz"), arrays)
    write_npz(str(tmp_path / "two.npz"), arrays)
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    with np.load(tmp_path / "one.npz") as z:
        np.testing.assert_array_equal(z["b"], arrays["b"])


# ---- end to end -----------------------------------------------------------------------------------

KEEP = {"digits": 1.0, "shapes": 0.3, "textures": 0.1, "gradients": 0.05}  # 200 / 60 / 20 / 10 of 200 each
SIZE = 80


def _imbalanced_pool(root, corpus) -> tuple[str, dict[str, str]]:
    """The demo pool's samples in 70/20/7/3 % domain shares (the first of each domain kept), in two shards."""
    import webdataset as wds

    from sept.data.samples import iter_samples
    from sept.data.shards import list_shards

    truth = corpus.truth()
    kept: dict[str, int] = {}
    per_domain = {d: sum(1 for v in truth.values() if v == d) for d in KEEP}
    samples = []
    for shard in list_shards(corpus.pool_spec):
        for s in iter_samples(shard):
            d = truth[s.key]
            if kept.get(d, 0) < round(KEEP[d] * per_domain[d]):
                kept[d] = kept.get(d, 0) + 1
                samples.append(s)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(samples)), 2)):
        path = os.path.join(root, f"imbalanced-{i}.tar")
        with wds.TarWriter(path, encoder=False, mtime=0.0) as sink:
            for j in part.tolist():
                sink.write({"__key__": samples[j].key, **samples[j].members})
        paths.append(path)
    listing = os.path.join(root, "pool.txt")
    with open(listing, "w") as f:
        f.write("\n".join(paths) + "\n")
    return listing, {s.key: truth[s.key] for s in samples}


def _digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name != ".lock":
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.integration
def test_curate_end_to_end_on_the_two_node_cluster(tmp_path, ray_cluster):
    from test_select_tasks import _tiny_config, make_edge_encoder

    from sept.cluster.index_build import embeddings_fingerprint
    from sept.data.decode import decode_image
    from sept.data.demo_corpus import make_demo_corpus
    from sept.data.report import ReportConfig, write_report
    from sept.data.samples import iter_samples
    from sept.data.shards import list_shards

    corpus = make_demo_corpus(
        str(tmp_path / "corpus"), pool_size=800, shards=2, target_train_per_class=1, target_val_per_class=1, seed=4
    )
    pool, truth = _imbalanced_pool(str(tmp_path), corpus)
    images = [decode_image(s.members["jpg"]) for shard in list_shards(pool) for s in iter_samples(shard)]
    encoder = make_edge_encoder(str(tmp_path / "enc.pt"), images[::2])
    emb = str(tmp_path / "emb.zarr")
    ray_cluster.run_sept("embed", "--pool", pool, "--encoder", encoder, "--out", emb, "--workers", "2")

    store = EmbeddingStore.open(emb)
    _, ids = store.read_all()
    removed = ids[5::9]  # stand-ins for what `sept dedup` would remove
    attrs = {"fingerprint": embeddings_fingerprint(store)}
    DedupTable(removed, removed - 1, np.full(len(removed), NEAR), np.ones(len(removed)), attrs).write(emb)

    sel = str(tmp_path / "sel")
    command = ["curate", "--embeddings", emb, "--size", str(SIZE), "--out", sel, "--seed", "0"]
    proc = ray_cluster.run_sept(*command)
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])["tasks"]["curated"]
    with open(os.path.join(sel, "tasks", "curated", "manifest.jsonl")) as f:
        manifest = [json.loads(line) for line in f]
    assert len(manifest) == SIZE == summary["selected"] and len({r["id"] for r in manifest}) == SIZE
    assert summary["pool"]["dedup_skipped"] == len(removed) and not np.isin([r["id"] for r in manifest], removed).any()
    assert summary["cluster_sizes"]["sample"]["entropy"] > summary["cluster_sizes"]["pool"]["entropy"]

    domains = list(KEEP)
    ours = np.bincount([domains.index(truth[r["key"]]) for r in manifest], minlength=4)
    everyone = np.bincount([domains.index(d) for d in truth.values()], minlength=4)
    print(f"curated domains {ours.tolist()}, pool {everyone.tolist()}")
    assert entropy(ours) > entropy(everyone) + 0.05, (ours, everyone)  # random subsets follow the pool's shares
    assert ours[0] / ours[1:3].min() < everyone[0] / everyone[1:3].min() / 2, (ours, everyone)
    with np.load(os.path.join(sel, "tasks", "curated", "clusters.npz")) as z:
        assert z["centroids_1"].shape[0] == summary["clusters"][0] and z["pool_sizes"].sum() == len(ids) - len(removed)

    first = _digest(sel)
    ray_cluster.run_sept(*command)  # a finished run: nothing new, every byte the same
    assert _digest(sel) == first

    run = tmp_path / "run"
    data = os.path.join(sel, "tasks", "curated")
    run_sept(
        "pretrain",
        "--data",
        data,
        "--out",
        str(run),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--config",
        _tiny_config(tmp_path),
    )
    assert (run / "encoder.pt").is_file()

    result = write_report(ReportConfig(selection=sel, out=str(tmp_path / "report"), top=4))
    files = result["tasks"]["curated"]["files"]
    assert files["contacts"] and files["clusters"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "largest top-level clusters" in page and files["clusters"] in page
