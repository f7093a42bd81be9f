"""sept index: train the FAISS index once, then encode its shards in parallel as Ray tasks.

Training reads a bounded random sample of the embeddings (chunk by chunk, never the pool), of
the size ``resolve_train_size`` gives (``--train-size``, else chosen from the factory's lists).
Each index shard owns a list of pool shards, and its encoding task reads only those, one batch
of rows at a time, so a task's memory is its shard's codes plus one batch, never the pool. A
task takes ``--cpus-per-task`` Ray CPUs and runs as many faiss OpenMP threads. With
``--task-vectors`` an index shard holding more vectors than that is encoded by several tasks,
each over a run of its pool shards, whose codes one more task merges (list by list, in pool
order: the same shard one task would write) and writes. A rerun with the same embeddings and
spec resumes at the missing shards; ``--add`` encodes only pool shards embedded since (new index
shards, the trained quantizer reused), never a rebuild. The check that every vector was encoded
reads each shard's stored ntotal, never its codes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
from tqdm import tqdm

from sept import storage
from sept.cluster.runtime import completed_with_deadline, ray_session
from sept.errors import SeptError
from sept.index.codes import ShardEncoder, train_index
from sept.index.embedding_store import CHUNK_ROWS, EmbeddingStore
from sept.index.spec import (
    IndexSpec,
    choose_factory,
    format_bytes,
    index_bytes,
    make_index,
    resolve_train_size,
)
from sept.index.store import IndexStore
from sept.io import atomic_write_json
from sept.training.encoder.identity import require_same_encoder

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    embeddings: str = field(metadata={"help": "embeddings store from `sept embed`"})
    out: str
    spec: IndexSpec = field(default_factory=IndexSpec)
    ray_address: str | None = None
    memory_budget: int | None = field(  # bytes; the command line takes a size (sept.index.spec.parse_bytes)
        default=None,
        metadata={
            "type": str,
            "metavar": "SIZE",
            "help": "memory the finished index may take, e.g. 16G or 512M; guides the choice of factory",
        },
    )
    add: bool = field(default=False, metadata={"help": "encode only pool shards embedded since the index was built"})
    allow_partial: bool = field(
        default=False,
        metadata={"help": "index the complete shards of an embeddings store that has incomplete ones"},
    )
    cpus_per_task: int = field(
        default=1, metadata={"help": "Ray CPUs of each encoding task; faiss runs as many OpenMP threads in it"}
    )
    task_vectors: int = field(
        default=0,
        metadata={
            "help": "vectors one encoding task encodes at most: an index shard holding more is split "
            "into tasks over runs of its pool shards, then merged (default 0: one task per index shard)"
        },
    )
    task_timeout_s: float = field(
        default=3600.0,
        metadata={"help": "an encoding task with no result this long is cancelled and retried (default: %(default)s)"},
    )
    max_attempts: int = field(default=3, metadata={"help": "tries of each encoding task before the run fails"})
    batch_rows: int = CHUNK_ROWS  # embeddings rows an encoding task holds at once


def embeddings_fingerprint(emb: EmbeddingStore, shard_indices: list[int] | None = None) -> str:
    """Identifies the embeddings an index was built from: encoder, and path and size of each indexed shard."""
    counts = {i: emb.shard_count(i) for i in (emb.complete_shards() if shard_indices is None else shard_indices)}
    return _fingerprint(emb.encoder.identity, emb.pool, counts)


def _fingerprint(identity: str, pool: list[str], counts: dict[int, int]) -> str:
    h = hashlib.sha256()
    h.update(identity.encode())
    for i in sorted(counts):
        h.update(f"{i}:{pool[i]}:{counts[i]}\n".encode())
    return h.hexdigest()[:16]


def encode_pool_shards(
    embeddings: str, index_path: str, pool_shards: list[int], batch_rows: int = CHUNK_ROWS, threads: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, ids, codes) of the given pool shards, encoded by the index's trained quantizer
    with ``threads`` faiss OpenMP threads (a task's CPUs); memory is the codes plus one batch."""
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))
    emb = EmbeddingStore(embeddings)
    encoder = ShardEncoder(IndexStore(index_path).trained_index())
    for x, ids in emb.iter_batches(pool_shards, batch_rows):
        encoder.add(x, ids)
    return encoder.finish()


def merge_parts(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's (offsets, ids, codes) from parts encoded apart: each list holds its rows of
    the first part, then of the second, ... (what encoding the parts' vectors in order gives)."""
    if len(parts) == 1:
        return parts[0]
    lists = [np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)) for offsets, _, _ in parts]
    order = np.argsort(np.concatenate(lists), kind="stable")
    sizes = sum(np.diff(offsets) for offsets, _, _ in parts)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    offsets[1:] = np.cumsum(sizes)
    ids = np.concatenate([p[1] for p in parts])[order]
    codes = np.concatenate([p[2] for p in parts])[order]
    return offsets, ids, codes


@ray.remote(num_cpus=1)
def encode_index_shard(
    embeddings: str,
    index_path: str,
    index_shard: int,
    pool_shards: list[int],
    batch_rows: int = CHUNK_ROWS,
    threads: int = 1,
) -> dict:
    import faiss

    offsets, ids, codes = encode_pool_shards(embeddings, index_path, pool_shards, batch_rows, threads)
    IndexStore(index_path).write_shard(index_shard, offsets, ids, codes)
    return dict(ntotal=len(ids), threads=faiss.omp_get_max_threads())


@ray.remote(num_cpus=1)
def encode_index_part(
    embeddings: str, index_path: str, pool_shards: list[int], batch_rows: int = CHUNK_ROWS, threads: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    import faiss

    return (*encode_pool_shards(embeddings, index_path, pool_shards, batch_rows, threads), faiss.omp_get_max_threads())


@ray.remote(num_cpus=1)
def write_index_shard(index_path: str, index_shard: int, *parts) -> dict:
    """Merge an index shard's parts (encode_index_part's results) and write the shard."""
    offsets, ids, codes = merge_parts([p[:3] for p in parts])
    IndexStore(index_path).write_shard(index_shard, offsets, ids, codes)
    return dict(ntotal=len(ids), threads=min(int(p[3]) for p in parts), parts=len(parts))


def split_pool_shards(pool_shards: list[int], counts: dict[int, int], task_vectors: int) -> list[list[int]]:
    """Runs of consecutive pool shards of at most task_vectors vectors each (a pool shard larger
    than that is a run alone); one run when task_vectors is 0."""
    if task_vectors <= 0:
        return [list(pool_shards)]
    runs, run, held = [], [], 0
    for i in pool_shards:
        if run and held + counts[i] > task_vectors:
            runs.append(run)
            run, held = [], 0
        run.append(i)
        held += counts[i]
    return runs + [run] if run else runs or [[]]


def _require_index_encoder(index_attrs: dict, emb: EmbeddingStore, index_path: str) -> None:
    ours = emb.encoder
    require_same_encoder(
        index_attrs,
        identity=ours.identity,
        arch=ours.arch,
        dim=ours.dim,
        source=f"embeddings {emb.path}",
        index_path=index_path,
    )


def build_index(cfg: IndexConfig) -> dict:
    """Build (or resume, or with cfg.add grow) the index store at cfg.out. Returns a summary."""
    emb = EmbeddingStore.open(cfg.embeddings)
    missing = emb.missing_shards()
    if missing and not cfg.allow_partial:
        raise SeptError(
            f"{cfg.embeddings} has {len(missing)} incomplete shard(s), first {emb.pool[missing[0]]}; "
            "rerun `sept embed` to finish them, or pass --allow-partial to index the complete ones"
        )
    counts = {i: emb.shard_count(i) for i in emb.complete_shards()}
    n, dim = sum(counts.values()), emb.dim
    if n == 0:
        raise SeptError(f"{cfg.embeddings} holds no vectors")
    if missing:
        log.warning("index: --allow-partial: leaving out %d incomplete shard(s) of %s", len(missing), cfg.embeddings)
    exists = storage.exists(storage.join(cfg.out, "zarr.json"))
    if cfg.add:
        if not exists:
            raise SeptError(f"--add needs an existing index at {cfg.out}; build it first without --add")
        store, added = _grow(cfg, emb, counts)
    else:
        store, added = _open_or_create(cfg, emb, counts), None
    reports = _encode_missing(cfg, emb, store)
    attrs = store.attrs
    expected = sum(int(c) for c in attrs["indexed_counts"].values())
    encoded = sum(store.shard_ntotal(j) for j in range(store.nshards))  # the shards' attributes, not their codes
    if encoded != expected:
        raise SeptError(f"index shards hold {encoded} vectors but the embeddings hold {expected}; rerun `sept index`")
    store.update_attrs(complete=True, ntotal=expected)
    summary = dict(
        factory=attrs["spec"]["factory"],
        reason=attrs["factory_reason"],
        ntotal=expected,
        dim=dim,
        shards=store.nshards,
        nprobe=attrs.get("nprobe"),
        train_size=attrs["spec"].get("train_size"),
        cpus_per_task=cfg.cpus_per_task,
        path=store.path,
        left_out_incomplete=[emb.pool[i] for i in missing],
    )
    if reports:
        summary["encode_threads"] = sorted({int(r["threads"]) for r in reports})
    if added is not None:
        summary["added"] = added
    _write_json(
        storage.join(store.path, "config.json"), dict(config=dict(asdict(cfg), spec=attrs["spec"]), summary=summary)
    )
    return summary


def _resolve_factory(cfg: IndexConfig, n: int, dim: int) -> tuple[str, str]:
    spec = cfg.spec
    if not spec.factory:
        return choose_factory(n, dim, cfg.memory_budget, spec.train_size)
    why = "given with --factory"
    if cfg.memory_budget is not None:
        try:
            need = index_bytes(spec.factory, n, dim)
        except (AttributeError, ValueError):  # a factory form the estimate does not know
            need = None
        if need is not None and need > cfg.memory_budget:
            raise SeptError(
                f"--factory {spec.factory} needs about {format_bytes(need)} for {n} vectors, over "
                f"--memory-budget {format_bytes(cfg.memory_budget)}"
            )
    return spec.factory, why


def _open_or_create(cfg: IndexConfig, emb: EmbeddingStore, counts: dict[int, int]) -> IndexStore:
    spec = cfg.spec
    n, dim = sum(counts.values()), emb.dim
    metric = spec.faiss_metric()
    fingerprint = _fingerprint(emb.encoder.identity, emb.pool, counts)
    if storage.exists(storage.join(cfg.out, "zarr.json")):
        return _reopen(cfg, emb, counts, fingerprint)
    if storage.listdir(cfg.out):
        raise SeptError(f"{cfg.out} exists and is not a sept index; choose another --out")
    factory, why = _resolve_factory(cfg, n, dim)
    index = make_index(factory, dim, metric)  # fails fast on a bad factory string, before any work
    train_size = spec.train_size
    if not index.is_trained:
        train_size, train_why = resolve_train_size(factory, n, spec.train_size, dim)
        if spec.factory:  # choose_factory's reason already says how it is trained
            why = f"{why}; {train_why}"
    log.info("index: chose %s: %s", factory, why)
    nshards = max(1, min(spec.shards, len(counts)))
    assignment = [a.tolist() for a in np.array_split(np.array(sorted(counts)), nshards)]
    if not index.is_trained:
        sample = emb.sample(train_size, seed=spec.seed)
        if len(sample) < _min_train(index):
            raise SeptError(
                f"factory {factory!r} needs at least {_min_train(index)} training vectors; "
                f"the embeddings hold {len(sample)}"
            )
        log.info("index: training %s on %d sampled vectors (seed %d)", factory, len(sample), spec.seed)
        train_index(index, sample, seed=spec.seed)
        del sample
    attrs = dict(
        spec=dict(spec.to_dict(), factory=factory, shards=nshards, train_size=train_size),
        factory_reason=why,
        dim=dim,
        metric=spec.metric,
        encoder=emb.encoder.to_dict(),
        embeddings=dict(path=emb.path, fingerprint=fingerprint),
        pool=emb.pool,
        assignment=assignment,
        indexed_counts={str(i): c for i, c in counts.items()},
        ntotal=n,
        nprobe=spec.nprobe,
        memory_budget=cfg.memory_budget,
    )
    return IndexStore.create(cfg.out, trained=index, attrs=attrs)


def _reopen(cfg: IndexConfig, emb: EmbeddingStore, counts: dict[int, int], fingerprint: str) -> IndexStore:
    """The existing index at cfg.out, to resume, if it was built from these embeddings with this spec."""
    store = IndexStore.open(cfg.out)
    old = store.attrs
    _require_index_encoder(old, emb, cfg.out)
    if old["embeddings"]["fingerprint"] != fingerprint:
        old_counts = {int(i): int(c) for i, c in old.get("indexed_counts", {}).items()}
        if old_counts and all(
            i < len(emb.pool) and counts.get(i) == c and emb.pool[i] == old["pool"][i] for i, c in old_counts.items()
        ):
            new = len(set(counts) - set(old_counts))
            raise SeptError(
                f"{cfg.out} indexes {len(old_counts)} shard(s) of these embeddings and {new} were "
                "embedded since: pass --add to encode only those, or choose another --out"
            )
        raise SeptError(f"{cfg.out} already holds an index of other embeddings; choose another --out or delete it")
    spec = cfg.spec
    given = dict(metric=spec.metric, **({"factory": spec.factory} if spec.factory else {}))
    if any(old["spec"].get(key) != value for key, value in given.items()):
        raise SeptError(
            f"{cfg.out} already holds an index with another spec ({old['spec']['factory']}, "
            f"metric {old['spec']['metric']}); choose another --out or delete it"
        )
    return store


def _grow(cfg: IndexConfig, emb: EmbeddingStore, counts: dict[int, int]) -> tuple[IndexStore, int]:
    """Assign the pool shards embedded since the index was built to new index shards."""
    store = IndexStore.open(cfg.out)
    attrs = store.attrs
    _require_index_encoder(attrs, emb, cfg.out)
    old_counts = {int(i): int(c) for i, c in attrs["indexed_counts"].items()}
    for i, c in sorted(old_counts.items()):
        if i >= len(emb.pool) or emb.pool[i] != attrs["pool"][i]:
            raise SeptError(
                f"{cfg.embeddings} does not list pool shard {attrs['pool'][i]} where index {cfg.out} "
                "has it; --add needs the same pool listing, grown at its end"
            )
        if counts.get(i) != c:
            raise SeptError(
                f"pool shard {emb.pool[i]} holds {counts.get(i, 'no')} vectors in {cfg.embeddings} but "
                f"{c} in index {cfg.out}; rebuild the index"
            )
    new = sorted(set(counts) - set(old_counts))
    if not new:
        log.info("index --add: no pool shard was embedded since %s was built", cfg.out)
        return store, 0
    per = max(1, max(len(a) for a in attrs["assignment"]))
    groups = [new[k : k + per] for k in range(0, len(new), per)]
    all_counts = {**old_counts, **{i: counts[i] for i in new}}
    # recorded before any encoding: a crash mid-add resumes with the same assignment
    store.update_attrs(
        assignment=attrs["assignment"] + groups,
        indexed_counts={str(i): c for i, c in all_counts.items()},
        pool=emb.pool,
        complete=False,
        ntotal=sum(all_counts.values()),
        embeddings=dict(path=emb.path, fingerprint=_fingerprint(emb.encoder.identity, emb.pool, all_counts)),
    )
    added = sum(counts[i] for i in new)
    log.info("index --add: %d new pool shard(s), %d vectors, into %d new index shard(s)", len(new), added, len(groups))
    return store, added


def _encode_missing(cfg: IndexConfig, emb: EmbeddingStore, store: IndexStore) -> list[dict]:
    """Encode the index shards not yet complete; returns each task's report (ntotal, threads)."""
    attrs = store.attrs
    assignment = attrs["assignment"]
    todo = [j for j in range(len(assignment)) if not store.is_complete(j)]
    if not todo:
        return []
    if cfg.cpus_per_task < 1:
        raise SeptError(f"--cpus-per-task must be at least 1, got {cfg.cpus_per_task}")
    counts = {int(i): int(c) for i, c in attrs["indexed_counts"].items()}
    with ray_session(cfg.ray_address):
        _require_cpus(cfg.cpus_per_task)
        cpus = dict(num_cpus=cfg.cpus_per_task)
        args = (cfg.batch_rows, cfg.cpus_per_task)
        runs_of = {j: split_pool_shards(assignment[j], counts, cfg.task_vectors) for j in todo}

        def submit(j: int):
            runs = runs_of[j]
            if len(runs) == 1:
                return encode_index_shard.options(**cpus).remote(emb.path, store.path, j, runs[0], *args)
            parts = [encode_index_part.options(**cpus).remote(emb.path, store.path, run, *args) for run in runs]
            return write_index_shard.remote(store.path, j, *parts)

        log.info(
            "index: encoding %d index shard(s) in %d task(s) of %d CPU(s) each",
            len(todo),
            sum(len(runs) for runs in runs_of.values()),
            cfg.cpus_per_task,
        )
        reports = []
        with tqdm(total=len(todo), desc="index", unit="shard", dynamic_ncols=True) as bar:
            # A task stuck on a stalled read is cancelled and tried again, never waited on forever.
            for _, ref in completed_with_deadline(
                todo,
                submit,
                timeout_s=cfg.task_timeout_s,
                attempts=cfg.max_attempts,
                describe=lambda j: f"index shard {j} (pool shards {assignment[j][0]}..{assignment[j][-1]})",
            ):
                reports.append(ray.get(ref))
                bar.update(1)
    return reports


def _require_cpus(cpus_per_task: int) -> None:
    """A task asking for more CPUs than any node has would wait forever: refuse it now."""
    most = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if cpus_per_task > most:
        raise SeptError(f"--cpus-per-task {cpus_per_task} exceeds the CPUs of every Ray node (at most {most:g})")


def _write_json(path: str, obj: dict) -> None:
    atomic_write_json(path, obj, default=str)


def _min_train(index) -> int:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1
