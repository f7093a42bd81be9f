"""sept curate: a generic, balanced subset of the pool, written as a selection every later stage reads.

``CurateConfig`` is every option of ``sept curate``. ``curate`` clusters the pool's embeddings
hierarchically (``sept.index.hierarchical_kmeans``, in the driver: faiss, on a GPU when one is
there), draws ``size`` samples balanced over the top-level clusters, and writes them as the task
``curated`` of a selection folder (``sept.data.selection_folder``), copied into its shared shards
by Ray copy jobs (``sept.cluster.materialize``): ``sept pretrain --data SEL/tasks/curated`` trains on it.

Besides the task's usual files, ``SEL/tasks/curated/clusters.npz`` holds the tree (``centroids_L``
per level, finest first, and ``parents_L``: the level-(L+1) cluster of each level-L cluster), the
top-level cluster sizes in the pool and in the sample (``pool_sizes``, ``sample_sizes``) and each
chosen sample's ``ids``, ``level1`` and ``top`` cluster. Choice rows name the sample's top-level
cluster (``cls`` and ``chosen_by``, "c0042"), its level-1 cluster (``retrieved_by``) and its
cosine to that cluster's centroid (``score``).

Level 1 trains on a sample of the pool (``train_size``); every sample is then assigned batch by
batch, holding a level-1 label, a distance and an id per sample (16 bytes) and no vectors. Ids the
pool's dedup table removes (``sept.index.dedup_table``) are left out unless ``dedup`` is off. A
rerun of a finished command changes no byte; an interrupted one resumes: a chosen task is not
clustered again, and finished copy jobs are not redone.
"""

from __future__ import annotations

import io
import logging
import math
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from sept import storage
from sept.data import selection_folder as folder
from sept.errors import SeptError
from sept.index import hierarchical_kmeans as hk
from sept.index.dedup import normalize
from sept.index.dedup_table import DedupTable
from sept.index.embedding_store import EmbeddingStore
from sept.io import atomic_write_bytes

log = logging.getLogger(__name__)

TASK = "curated"
STRATEGY = "curated"  # task.json config["strategy"]: how `sept report` tells a curated task
CLUSTERS_FILE = "clusters.npz"
DEFAULT_TRAIN_SIZE = 2_000_000  # level-1 k-means sample: ~3 GB of 384-d float32
TRAIN_PER_CLUSTER = 20  # ...raised to this many points a level-1 cluster when k_1 is large


@dataclass
class CurateConfig:
    embeddings: str = field(metadata={"help": "embeddings store from `sept embed`"})
    size: int = field(metadata={"help": "pool samples to draw"})
    out: str = field(default="", metadata={"help": "selection directory to write (task 'curated')", "required": True})
    clusters: list[int] = field(
        default_factory=list,
        metadata={
            "sep": ",",
            "metavar": "K1,K2,...",
            "help": "clusters per level, finest first (level 1 clusters the samples, each next level the "
            "centroids below it), e.g. 10000,1000,100 (default: about 10 samples a level-1 cluster, then a "
            "seventh a level while at least 3 remain, at most 4 levels)",
        },
    )
    resampling_steps: int = field(
        default=10,
        metadata={"help": "k-means reruns per level on the samples nearest each centroid, to spread the centroids"},
    )
    sample_size: list[int] = field(
        default_factory=list,
        metadata={
            "sep": ",",
            "metavar": "R1,R2,...",
            "help": "points of each cluster a resampling step keeps, one per level or one for all "
            "(default: half the level's mean cluster size)",
        },
    )
    sampling: str = field(
        default="random",
        metadata={
            "choices": hk.SAMPLINGS,
            "help": "within a level-1 cluster, draw its share at random, or take the samples closest to its centroid",
        },
    )
    train_size: int | None = field(
        default=None,
        metadata={
            "help": f"pool samples the level-1 k-means trains on (default: all, up to {DEFAULT_TRAIN_SIZE:,} or "
            f"{TRAIN_PER_CLUSTER} a cluster); every sample is assigned afterwards"
        },
    )
    niter: int = field(default=20, metadata={"help": "iterations of each k-means"})
    seed: int = field(default=0, metadata={"help": "seed of the k-means and of the sampling"})
    dedup: bool = field(
        default=True,
        metadata={
            "help": "skip the samples the store's dedup table (`sept dedup`) removes, when it has one "
            "(default: on; --no-dedup keeps them)"
        },
    )
    # how, not what
    gpu: bool | None = field(
        default=None,
        metadata={"help": "k-means on the GPU (default: when faiss sees one; --gpu requires one, --no-gpu never)"},
    )
    ray_address: str | None = None
    copy_timeout_s: float = field(
        default=1800.0,
        metadata={"help": "seconds a copy job may take before it counts as stalled and is retried (3 tries)"},
    )


def curate(cfg: CurateConfig) -> dict:
    """Curate ``cfg.size`` samples into ``cfg.out`` (task ``curated``); returns the task's summary and the shards'."""
    from sept.cluster.index_build import embeddings_fingerprint
    from sept.cluster.materialize import materialize
    from sept.cluster.runtime import ray_session

    started = time.time()
    _check(cfg)
    emb = EmbeddingStore.open(cfg.embeddings)
    missing = emb.missing_shards()
    if missing:
        raise SeptError(
            f"{cfg.embeddings}: {len(missing)} pool shard(s) not embedded yet (first {emb.pool[missing[0]]}); "
            "rerun `sept embed`"
        )
    fingerprint = embeddings_fingerprint(emb)
    table = DedupTable.read(emb.path, fingerprint=fingerprint) if cfg.dedup else None
    settings = _task_config(cfg, emb.total_count() - (len(table) if table is not None else 0), table)
    out = storage.resolve(cfg.out)
    storage.makedirs(out)
    with folder.writer_lock(out):
        shared = dict(embeddings=fingerprint, encoder=emb.encoder.identity, kind=STRATEGY)
        folder.claim_selection(out, shared, cfg.out)
        folder.claim_task(out, TASK, settings, cfg.out)
        if not folder.task_is_chosen(out, TASK):
            _choose(cfg, emb, table, settings, out)
        union = folder.union_of_choices(out)
        shards = folder.shards_dir(out)
        held = folder.read_catalog(shards).ids
        copied = len(np.setdiff1d(union, held))
        with ray_session(cfg.ray_address) if copied else nullcontext():
            materialize(union, emb.pool, shards, timeout_s=cfg.copy_timeout_s)
        catalog = folder.read_catalog(shards)
        folder.write_manifest(out, TASK, catalog)
    summary = folder.task_summary(out, TASK)
    log.info(
        "curate: %d samples from %d top-level clusters in %d shared shards (%d copied now) in %.1fs",
        len(union),
        settings["clusters"][-1],
        len(catalog.parts),
        copied,
        time.time() - started,
    )
    return dict(
        tasks={TASK: summary},
        out=out,
        samples=len(union),
        copied=copied,
        shards=sorted(catalog.parts),
        seconds=round(time.time() - started, 1),
    )


def _check(cfg: CurateConfig) -> None:
    if not cfg.out:
        raise SeptError("no --out folder given")
    if cfg.size < 1:
        raise SeptError(f"--size must be at least 1, got {cfg.size}")
    if cfg.resampling_steps < 0:
        raise SeptError(f"--resampling-steps must be at least 0, got {cfg.resampling_steps}")
    if any(r < 1 for r in cfg.sample_size):
        raise SeptError(f"--sample-size values must be at least 1, got {','.join(map(str, cfg.sample_size))}")
    if cfg.sampling not in hk.SAMPLINGS:
        raise SeptError(f"--sampling {cfg.sampling!r} is unknown; use one of {', '.join(hk.SAMPLINGS)}")
    if cfg.train_size is not None and cfg.train_size < 1:
        raise SeptError(f"--train-size must be at least 1, got {cfg.train_size}")


def _task_config(cfg: CurateConfig, n: int, table: DedupTable | None) -> dict:
    """What decides the curated sample (task.json's config), with every default resolved for ``n`` samples."""
    levels = list(cfg.clusters) or hk.default_levels(n)
    train = min(n, cfg.train_size or max(DEFAULT_TRAIN_SIZE, TRAIN_PER_CLUSTER * levels[0]))
    try:
        hk.check_levels(levels, train, flag="--clusters" if cfg.clusters else "the default --clusters")
    except ValueError as err:
        raise SeptError(f"{err} (the pool has {n} samples to cluster, {train} in the level-1 sample)") from None
    sizes = list(cfg.sample_size) or hk.default_sample_sizes(levels, train)
    if len(sizes) == 1:
        sizes = sizes * len(levels)
    if len(sizes) != len(levels):
        raise SeptError(f"--sample-size gives {len(sizes)} values for {len(levels)} levels; give one or one a level")
    return dict(
        strategy=STRATEGY,
        size=cfg.size,
        clusters=levels,
        resampling_steps=cfg.resampling_steps,
        sample_size=sizes,
        sampling=cfg.sampling,
        train_size=train,
        niter=cfg.niter,
        seed=cfg.seed,
        dedup=cfg.dedup,
        dedup_removed=len(table) if table is not None else None,
    )


def _use_gpu(gpu: bool | None) -> bool:
    import faiss

    found = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu and not found:
        raise SeptError("--gpu: faiss sees no GPU (install faiss-gpu, or pass --no-gpu)")
    return bool(found) if gpu is None else gpu


def _choose(cfg: CurateConfig, emb: EmbeddingStore, table: DedupTable | None, settings: dict, out: str) -> None:
    """Cluster, draw and record the curated task (its choice rows last: they mark it chosen)."""
    gpu = _use_gpu(cfg.gpu)
    levels, seed = settings["clusters"], settings["seed"]
    x, _ = _training_sample(emb, table, settings["train_size"], seed)
    log.info("curate: hierarchical k-means %s of %d samples (gpu: %s)", levels, len(x), gpu)
    tree = hk.hierarchical_kmeans(
        x,
        levels,
        steps=settings["resampling_steps"],
        sample_sizes=settings["sample_size"],
        seed=seed,
        niter=settings["niter"],
        gpu=gpu,
    )
    del x
    level1, dist, ids, skipped = _assign_pool(emb, table, tree, gpu)
    chosen = hk.balanced_sample(level1, tree, cfg.size, distances=dist, sampling=settings["sampling"], seed=seed)
    centroid_norm = np.linalg.norm(tree.centroids[0], axis=1)
    c1 = level1[chosen].astype(np.int64)
    # For unit x: |x - c|^2 = 1 + |c|^2 - 2 x.c, so cos(x, c) = (1 + |c|^2 - D) / (2 |c|).
    scores = (1.0 + centroid_norm[c1] ** 2 - dist[chosen]) / (2.0 * np.maximum(centroid_norm[c1], 1e-12))
    top = tree.top_of(c1)
    pool_sizes = hk.level_counts(level1, tree)[-1]
    sample_sizes = np.bincount(top, minlength=levels[-1])
    chosen_ids = ids[chosen]
    arrays = {f"centroids_{i + 1}": c for i, c in enumerate(tree.centroids)}
    arrays.update({f"parents_{i + 1}": p for i, p in enumerate(tree.parents)})
    arrays.update(pool_sizes=pool_sizes, sample_sizes=sample_sizes, ids=chosen_ids, level1=c1, top=top)
    task = folder.task_dir(out, TASK)
    write_npz(storage.join(task, CLUSTERS_FILE), arrays)
    summary = dict(
        task=TASK,
        strategy=STRATEGY,
        size=cfg.size,
        selected=int(len(chosen)),
        pool=dict(samples=int(len(ids)), dedup_skipped=skipped, clustered=int(np.count_nonzero(level1 >= 0))),
        clusters=levels,
        gpu=gpu,
        scores=dict(
            min=float(scores.min()) if len(scores) else None,
            max=float(scores.max()) if len(scores) else None,
            mean=float(scores.mean()) if len(scores) else None,
        ),
        cluster_sizes=cluster_size_summary(pool_sizes, sample_sizes),
    )
    names = _names(levels[-1])
    level1_names = _names(levels[0], prefix="k")
    rows = (
        dict(id=int(i), score=float(s), chosen_by=names[t], cls=names[t], retrieved_by=[level1_names[c]])
        for i, s, t, c in zip(chosen_ids.tolist(), scores.tolist(), top.tolist(), c1.tolist())
    )
    folder.write_task_records(out, TASK, queries=[], leakage=[], summary=summary, choice=rows)
    if len(chosen) < cfg.size:
        log.warning("curate: the pool has only %d samples to draw of the %d asked", len(chosen), cfg.size)
    log.info(
        "curate: %d drawn; top-level clusters hold %d..%d samples in the pool, %d..%d in the sample",
        len(chosen),
        pool_sizes.min(),
        pool_sizes.max(),
        sample_sizes.min(),
        sample_sizes.max(),
    )


def _names(k: int, prefix: str = "c") -> list[str]:
    width = max(4, len(str(k - 1)))
    return [f"{prefix}{j:0{width}d}" for j in range(k)]


def _training_sample(emb: EmbeddingStore, table: DedupTable | None, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, ids) of ``n`` pool samples the dedup table keeps: all of them, or a uniform sample."""
    removed = len(table) if table is not None else 0
    total = emb.total_count()
    if n >= total - removed:
        x, ids = emb.read_all()
    else:  # draw the removed ones' worth more, so that n remain once they are dropped
        x, ids = emb.sample_with_ids(min(total, n + removed), seed=seed)
    if table is not None:
        keep = ~table.is_removed(ids)
        x, ids = x[keep], ids[keep]
    return normalize(x[:n]), ids[:n]


def _assign_pool(
    emb: EmbeddingStore, table: DedupTable | None, tree: hk.Hierarchy, gpu: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(level-1 cluster, squared distance to it, id) of every pool sample, batch by batch; a
    sample the dedup table removes gets cluster -1. Also returns how many those were."""
    index = hk.flat_index(tree.centroids[0], gpu)
    total = emb.total_count()
    level1 = np.full(total, -1, np.int32)
    dist = np.zeros(total, np.float32)
    ids = np.zeros(total, np.int64)
    row = skipped = 0
    with tqdm(total=total, desc="curate: assign", unit="sample", disable=None) as bar:
        for x, batch_ids in emb.iter_batches(emb.complete_shards()):
            end = row + len(batch_ids)
            ids[row:end] = batch_ids
            keep = np.ones(len(batch_ids), bool) if table is None else ~table.is_removed(batch_ids)
            skipped += int(len(keep) - keep.sum())
            if keep.any():
                D, I = hk.assign(normalize(x[keep]), tree.centroids[0], index=index)
                level1[row:end][keep] = I
                dist[row:end][keep] = D
            row = end
            bar.update(len(batch_ids))
    return level1, dist, ids, skipped


def cluster_size_summary(pool_sizes: np.ndarray, sample_sizes: np.ndarray) -> dict:
    """The top-level cluster sizes before (pool) and after (sample) balancing: their spread, and a
    histogram over power-of-two bins [0, 1), [1, 2), [2, 4), ..."""
    top = max(1, int(max(pool_sizes.max(initial=0), sample_sizes.max(initial=0))))
    edges = [0] + [2**i for i in range(int(math.log2(top)) + 2)]
    nonempty = pool_sizes > 0
    return dict(
        pool=_spread(pool_sizes[nonempty]),
        sample=_spread(sample_sizes[nonempty]),
        histogram=dict(
            edges=edges,
            pool=np.histogram(pool_sizes, bins=edges)[0].tolist(),
            sample=np.histogram(sample_sizes, bins=edges)[0].tolist(),
        ),
    )


def _spread(sizes: np.ndarray) -> dict:
    """Min, max, mean, largest-to-smallest ratio and normalised entropy (1 = even) of cluster sizes."""
    if not len(sizes) or not sizes.sum():
        return dict(clusters=int(len(sizes)), min=0, max=0, mean=0.0, ratio=None, entropy=None)
    p = sizes[sizes > 0] / sizes.sum()
    entropy = float(-(p * np.log(p)).sum() / np.log(len(sizes))) if len(sizes) > 1 else 1.0
    return dict(
        clusters=int(len(sizes)),
        min=int(sizes.min()),
        max=int(sizes.max()),
        mean=round(float(sizes.mean()), 3),
        ratio=round(float(sizes.max() / sizes.min()), 3) if sizes.min() else None,
        entropy=round(entropy, 4),
    )


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with fixed member times (the same arrays give the same bytes), written atomically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    atomic_write_bytes(path, buf.getvalue())
