"""sept dedup: pool-wide exact and near-duplicate removal on the embeddings, as Ray tasks, resumable.

The rules are ``sept.index.pool_dedup``'s; this module moves the data. It is a shuffle in three
rounds of tasks, each task's output published whole, so a killed run redoes only unfinished tasks:

1. **map**, a task per embedding shard: assign each vector to its nearest k-means centroid
   (centroids trained once, in the driver, on a sample) and write the shard's rows sorted by
   bucket (a bucket is a set of clusters, and a set of hash values), ``WORK/map/SHARD/``.
2. **exact**, a task per bucket: read that bucket's (id, hash) rows from every map part; equal
   hashes are one group, the smallest id stays. ``WORK/exact/BUCKET.npz``.
3. **near**, a task per bucket: read that bucket's vectors from every map part, drop the exact
   copies, and apply the near rule within each cluster. ``WORK/near/BUCKET.npz``.

The driver then joins the rounds into the dedup table (``sept.index.dedup_table``), published in
the store, and removes WORK. Each task holds one bucket (``--bucket-rows`` rows, about) or one
shard; the driver holds the centroids and, briefly, the removed ids: memory is O(removed), not
O(pool). WORK lives in the store, ``EMB/dedup-work``, and is kept only for settings and embeddings
that match; other settings start it afresh.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
import zarr
from tqdm import tqdm

from sept import storage
from sept.cluster.index_build import embeddings_fingerprint
from sept.cluster.runtime import completed_with_deadline, ray_session
from sept.errors import SeptError
from sept.index.dedup_table import EXACT, NEAR, REASONS, DedupTable
from sept.index.embedding_store import EmbeddingStore, shard_name
from sept.index.pool_dedup import exact_copies, near_copies, nearest_centroids, resolve_border, train_centroids
from sept.io import atomic_write_bytes, atomic_write_json, publish_dir, staging_dir

log = logging.getLogger(__name__)

WORK_DIR = "dedup-work"
# benchmarks/dedup_quality.py (RESULTS.md): on its icon pool no threshold below 1.0 reaches
# precision 0.99; at 0.96 an ImageNet encoder recalls 1.3x what pHash does at equal precision.
DEFAULT_THRESHOLD = 0.96


@dataclass
class DedupConfig:
    embeddings: str = field(metadata={"help": "embeddings store from `sept embed`; the table is written into it"})
    threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={"help": "cosine similarity at which two samples count as near copies (default: %(default)s)"},
    )
    cluster_size: int = field(
        default=1024,
        metadata={
            "help": "mean samples per k-means cluster; pairs are compared within a cluster, so the work is "
            "about n x this (default: %(default)s)"
        },
    )
    clusters: int | None = field(
        default=None, metadata={"help": "k-means clusters (default: pool size / --cluster-size)"}
    )
    border_margin: float = field(
        default=0.05,
        metadata={
            "help": "a vector whose second-nearest centroid is within this cosine of its nearest is also compared "
            "in that cluster, so copies a cluster border splits are found (0: never; default: %(default)s)"
        },
    )
    bucket_rows: int = field(
        default=1 << 20,
        metadata={"help": "rows each exact and near task holds, about: the pool is cut into that many buckets"},
    )
    train_size: int = field(
        default=0,
        metadata={"help": "vectors the k-means trains on (default 0: 64 a cluster up to 262144, then 40 a cluster)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the k-means sample and training"})
    gpu: bool | None = field(
        default=None,
        metadata={
            "help": "train the k-means on a GPU: --gpu requires one, --no-gpu never (default: if faiss sees one)"
        },
    )
    ray_address: str | None = None
    task_timeout_s: float = field(
        default=1800.0, metadata={"help": "a task with no result this long is retried (default: %(default)s)"}
    )
    max_attempts: int = field(default=3, metadata={"help": "tries of each task before the run fails"})


def default_train_size(n_clusters: int) -> int:
    """64 vectors a cluster up to 2^18 in all, then 40 a cluster (the fewest faiss takes without a
    warning). Training costs sample x clusters: linear in the clusters up to the cap, quadratic
    past it (some 6,500 clusters), where a GPU (--gpu) should train."""
    return max(40 * n_clusters, min(64 * n_clusters, 1 << 18))


# ---- tasks ---------------------------------------------------------------------------------------


def _map_part(work: str, shard: int) -> str:
    return storage.join(work, "map", shard_name(shard))


def _bucket_file(work: str, round_: str, bucket: int) -> str:
    return storage.join(work, round_, f"{bucket:05d}.npz")


def _save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(path))) as f:
        return {k: f[k] for k in f.files}


@ray.remote(num_cpus=1)
def map_shard(emb_path: str, work: str, shard: int, centroids: np.ndarray, buckets: int, margin: float) -> int:
    """Write one shard's rows sorted by bucket: by cluster for the near round (with the rows that visit
    their second cluster as guests), by hash for the exact round."""
    emb = EmbeddingStore(emb_path)
    x, ids = emb.read_shard(shard)
    hashes = emb.read_hashes(shard)
    if hashes is None:
        raise SeptError(
            f"embeddings shard {shard_name(shard)} ({emb.pool[shard]}) has no content hashes: it was embedded "
            "before sept recorded them; embed the pool again into a new --out"
        )
    near, sims = nearest_centroids(x, centroids, 2)
    visits = np.flatnonzero((near[:, 1] >= 0) & (sims[:, 1] >= sims[:, 0] - margin)) if margin > 0 else []
    rows = np.r_[np.arange(len(ids)), visits].astype(np.int64)
    cluster = np.r_[near[:, 0], near[visits, 1]]
    csim = np.r_[sims[:, 0], sims[visits, 1]]
    guest = np.r_[np.zeros(len(ids), bool), np.ones(len(visits), bool)]
    tmp = staging_dir(_map_part(work, shard))
    group = zarr.open_group(tmp, mode="w")
    by_cluster = np.argsort(cluster % buckets, kind="stable")
    by_hash = np.argsort(hashes[:, 0] % np.uint64(buckets), kind="stable")
    chunk = max(1, min(len(rows), 1 << 16))
    for name, values in (
        ("ids", ids[rows[by_cluster]]),
        ("cluster", cluster[by_cluster]),
        ("centroid_sim", csim[by_cluster]),
        ("guest", guest[by_cluster]),
        ("vectors", x[rows[by_cluster]].astype(np.float16)),
        ("hash_ids", ids[by_hash]),
        ("hashes", hashes[by_hash]),
    ):
        group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(chunk, *values.shape[1:]))[...] = (
            values
        )
    group.attrs.update(
        shard=shard,
        guests=len(visits),
        cluster_offsets=_offsets(cluster % buckets, buckets),
        hash_offsets=_offsets(hashes[:, 0] % np.uint64(buckets), buckets),
    )
    publish_dir(tmp, _map_part(work, shard))
    return len(ids)


def _offsets(bucket_of: np.ndarray, buckets: int) -> list[int]:
    return np.r_[0, np.cumsum(np.bincount(bucket_of.astype(np.int64), minlength=buckets))].tolist()


def _gather(work: str, shards: list[int], bucket: int, offsets: str, names: tuple[str, ...]) -> list[np.ndarray]:
    """The rows of one bucket from every map part: only the chunks holding them are read."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for shard in shards:
        group = zarr.open_group(storage.zarr_store(_map_part(work, shard), read_only=True), mode="r")
        lo, hi = group.attrs[offsets][bucket : bucket + 2]
        for name in names:
            out[name].append(np.asarray(group[name][lo:hi]))
    return [np.concatenate(out[name]) for name in names]


@ray.remote(num_cpus=1)
def exact_bucket(work: str, shards: list[int], bucket: int) -> int:
    ids, hashes = _gather(work, shards, bucket, "hash_offsets", ("hash_ids", "hashes"))
    removed, kept = exact_copies(ids, hashes)
    _save_npz(_bucket_file(work, "exact", bucket), removed=removed, kept=kept)
    return len(removed)


@ray.remote(num_cpus=1)
def near_bucket(work: str, shards: list[int], bucket: int, exact_removed: np.ndarray, threshold: float) -> int:
    names = ("ids", "cluster", "centroid_sim", "guest", "vectors")
    ids, cluster, csim, guest, x = _gather(work, shards, bucket, "cluster_offsets", names)
    keep = ~np.isin(ids, exact_removed)
    found = near_copies(ids[keep], x[keep].astype(np.float32), cluster[keep], csim[keep], threshold, guest[keep])
    a, b, s = found.border
    _save_npz(
        _bucket_file(work, "near", bucket),
        removed=found.removed,
        kept=found.kept,
        similarity=found.similarity,
        border_a=a,
        border_b=b,
        border_sim=s,
    )
    return len(found.removed)


# ---- the driver ----------------------------------------------------------------------------------


def dedup(cfg: DedupConfig) -> dict:
    """Compute and publish the store's dedup table; returns its summary. A rerun with the same
    settings on the same embeddings finds the table and does nothing."""
    if not -1.0 <= cfg.threshold <= 1.0:
        raise SeptError(f"--threshold is a cosine similarity in [-1, 1], got {cfg.threshold}")
    if cfg.cluster_size < 1 or cfg.bucket_rows < 1:
        raise SeptError("--cluster-size and --bucket-rows must be positive")
    emb = EmbeddingStore.open(cfg.embeddings)
    missing = emb.missing_shards()
    if missing:
        raise SeptError(
            f"embeddings {cfg.embeddings} lack shard {shard_name(missing[0])} ({emb.pool[missing[0]]}) and "
            f"{len(missing) - 1} more; finish `sept embed` first"
        )
    shards = emb.complete_shards()
    counts = {i: emb.shard_count(i) for i in shards}
    n = sum(counts.values())
    if n == 0:
        raise SeptError(f"embeddings {cfg.embeddings} hold no vectors")
    n_clusters = cfg.clusters or max(1, math.ceil(n / cfg.cluster_size))
    if n_clusters > n:
        raise SeptError(f"--clusters {n_clusters} exceeds the {n} vectors in {cfg.embeddings}")
    settings = dict(
        fingerprint=embeddings_fingerprint(emb),
        threshold=float(cfg.threshold),
        border_margin=float(cfg.border_margin),
        clusters=int(n_clusters),
        buckets=max(1, math.ceil(n / cfg.bucket_rows)),
        train_size=int(min(n, cfg.train_size or default_train_size(n_clusters))),
        seed=int(cfg.seed),
    )
    table = DedupTable.read(emb.path)
    if table is not None and table.attrs.get("settings") == settings:
        log.info("dedup: %s already holds the table for these settings", emb.path)
        return _summary(table, emb.path, n)
    work = storage.join(emb.path, WORK_DIR)
    _open_work(work, settings)
    gpu = _use_gpu(cfg.gpu)
    centroids = _centroids(emb, work, settings, gpu)
    buckets = settings["buckets"]
    with ray_session(cfg.ray_address):
        centroids_ref = ray.put(centroids)
        todo = [s for s in shards if not storage.exists(storage.join(_map_part(work, s), "zarr.json"))]
        _run_round(
            "map",
            todo,
            len(shards),
            lambda s: map_shard.remote(emb.path, work, s, centroids_ref, buckets, settings["border_margin"]),
            lambda s: f"dedup map of shard {shard_name(s)} ({emb.pool[s]})",
            cfg,
        )
        todo = [b for b in range(buckets) if not storage.exists(_bucket_file(work, "exact", b))]
        _run_round(
            "exact",
            todo,
            buckets,
            lambda b: exact_bucket.remote(work, shards, b),
            lambda b: f"dedup exact bucket {b}",
            cfg,
        )
        exact = _join(work, "exact", buckets)
        exact_ref = ray.put(np.sort(exact["removed"]))
        todo = [b for b in range(buckets) if not storage.exists(_bucket_file(work, "near", b))]
        _run_round(
            "near",
            todo,
            buckets,
            lambda b: near_bucket.remote(work, shards, b, exact_ref, settings["threshold"]),
            lambda b: f"dedup near bucket {b}",
            cfg,
        )
        near = _with_border(_join(work, "near", buckets), exact)
    table = _table(exact, near, dict(settings=settings, fingerprint=settings["fingerprint"], config=asdict(cfg)))
    table.write(emb.path)
    storage.remove_tree(work)
    summary = _summary(table, emb.path, n)
    log.info(
        "dedup: %d of %d samples removed (%d exact, %d near copies at cosine >= %g)",
        summary["removed"],
        n,
        summary["exact"],
        summary["near"],
        cfg.threshold,
    )
    return summary


def _open_work(work: str, settings: dict) -> None:
    state = storage.join(work, "run.json")
    if storage.exists(state):
        with storage.open_file(state, "r") as f:
            if json.load(f) == settings:
                log.info("dedup: resuming the unfinished run in %s", work)
                return
        log.info("dedup: %s holds a run with other settings or embeddings; starting afresh", work)
        storage.remove_tree(work)
    for sub in ("map", "exact", "near"):
        storage.makedirs(storage.join(work, sub))
    atomic_write_json(state, settings)


def _use_gpu(requested: bool | None) -> bool:
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if requested and not gpus:
        raise SeptError("--gpu asks for GPU k-means but faiss sees no GPU (faiss-cpu, or no CUDA device)")
    return bool(gpus) if requested is None else bool(requested)


def _centroids(emb: EmbeddingStore, work: str, settings: dict, gpu: bool) -> np.ndarray:
    path = storage.join(work, "centroids.npz")
    if storage.exists(path):
        return _load_npz(path)["centroids"]
    sample = emb.sample(settings["train_size"], seed=settings["seed"])
    log.info(
        "dedup: k-means of %d sampled vectors into %d clusters%s",
        len(sample),
        settings["clusters"],
        " on GPU" if gpu else "",
    )
    centroids = train_centroids(sample, settings["clusters"], seed=settings["seed"], gpu=gpu)
    _save_npz(path, centroids=centroids)
    return centroids


def _run_round(name: str, todo: list[int], total: int, submit, describe, cfg: DedupConfig) -> None:
    if len(todo) < total:
        log.info("dedup: %s: %d of %d tasks already done", name, total - len(todo), total)
    with tqdm(total=total, initial=total - len(todo), desc=f"dedup {name}", unit="task", dynamic_ncols=True) as bar:
        for _, ref in completed_with_deadline(
            todo, submit, timeout_s=cfg.task_timeout_s, attempts=cfg.max_attempts, describe=describe
        ):
            ray.get(ref)
            bar.update(1)


def _join(work: str, round_: str, buckets: int) -> dict[str, np.ndarray]:
    parts = [_load_npz(_bucket_file(work, round_, b)) for b in range(buckets)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _with_border(near: dict, exact: dict) -> dict[str, np.ndarray]:
    """The near round's removals plus those its border pairs add (``resolve_border``)."""
    standing = np.r_[near["kept"], exact["kept"]]
    removed, kept, sims = resolve_border(
        near["border_a"], near["border_b"], near["border_sim"], near["removed"], standing
    )
    if len(removed):
        log.info("dedup: %d more near copies found across cluster borders", len(removed))
    return dict(
        removed=np.r_[near["removed"], removed],
        kept=np.r_[near["kept"], kept],
        similarity=np.r_[near["similarity"], sims].astype(np.float32),
    )


def _table(exact: dict, near: dict, attrs: dict) -> DedupTable:
    """Both rounds as one table whose representatives all survive: an exact group's first member
    may itself be a near copy of another sample, which then stands for the whole group."""
    near_of = dict(zip(near["removed"].tolist(), zip(near["kept"].tolist(), near["similarity"].tolist())))
    kept, reason, sims = [], [], []
    for k in exact["kept"].tolist():
        if k in near_of:
            kept.append(near_of[k][0])
            reason.append(NEAR)
            sims.append(near_of[k][1])
        else:
            kept.append(k)
            reason.append(EXACT)
            sims.append(1.0)
    return DedupTable(
        np.concatenate([exact["removed"], near["removed"]]),
        np.concatenate([np.asarray(kept, np.int64), near["kept"]]),
        np.concatenate([np.asarray(reason, np.uint8), np.full(len(near["removed"]), NEAR, np.uint8)]),
        np.concatenate([np.asarray(sims, np.float32), near["similarity"]]),
        attrs,
    )


def _summary(table: DedupTable, path: str, n: int) -> dict:
    s = table.summary()
    return dict(
        table=storage.join(path, "dedup"),
        samples=n,
        kept=n - s["removed"],
        **s,
        threshold=table.attrs["settings"]["threshold"],
        reasons=list(REASONS.values()),
    )
