"""sept select: the retrieval coordinator, from target tasks to one set of shared WebDataset shards.

For every task of the run it embeds the target's train images (the queries) and held-out images
(val/, test/: the leakage guard), searches the index once for all of them together
(``sept.cluster.search``), and chooses each task's samples (``sept.index.strategies``): SEPT's
per-instance round robin by default, class-balanced, global top-k or k-means clusters, with
dedup, an optional near-duplicate rule and the leakage guard. When a task's neighbour lists turn
out too short for its budget, only that task is searched again with twice the neighbours.

The union of every task's samples is materialized once into ``OUT/shards`` (samples already
there are not copied again), then each task gets its manifest. The folder's files are described
in ``sept.data.selection_files``. A run resumes where it stopped: chosen tasks are not searched
again, finished copy jobs are not redone. A task already in OUT with another config is refused.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from sept.cluster.materialize import materialize, read_catalog, writer_lock
from sept.cluster.runtime import ray_session
from sept.cluster.search import DEFAULT_QUERY_BATCH, SearcherPool, SearchStats, search_index
from sept.data import selection_files as files
from sept.data.identity import split_ids
from sept.data.task_list import TaskSpec, heldout_refs, resolve_tasks
from sept.errors import SeptError
from sept.index.budget import neighbours_needed
from sept.index.dedup import NearDuplicateFilter, leaked_ids, to_similarity
from sept.index.store import IndexStore
from sept.index.strategies import (
    BALANCES,
    STRATEGIES,
    Choice,
    choose,
    choose_by_clusters,
    query_neighbours,
    train_clusters,
)
from sept.training.encoder.identity import require_same_encoder

log = logging.getLogger(__name__)

LEAK_NEIGHBOURS = 32  # first look at each held-out image's 32 nearest pool samples; more if all are close
NEIGHBOURS_SHOWN = 16  # per target image, in queries.jsonl (what the report shows)


@dataclass
class SelectConfig:
    index: str = field(metadata={"help": "index store from `sept index`"})
    encoder: str = field(metadata={"help": "the encoder the index was built with"})
    target: str | list[str] = field(
        default_factory=list,
        metadata={"help": "target task: ImageFolder dir with train/ (and val/, test/); repeat for several tasks"},
    )
    budget: int | None = field(default=None, metadata={"help": "pool samples to select per task"})
    out: str = field(
        default="", metadata={"help": "selection directory to write (shared by its tasks)", "required": True}
    )
    task: str | list[str] = field(
        default_factory=list,
        metadata={"help": "task name, one per --target in order (default: the target directory's name)"},
    )
    tasks_file: str | None = field(
        default=None,
        metadata={
            "flag": "--tasks",
            "metavar": "TASKS.yaml",
            "help": "YAML list of tasks (name, target, budget), instead of or besides --target",
        },
    )
    strategy: str = field(
        default="instance",
        metadata={
            "choices": STRATEGIES,
            "help": "instance: SEPT's per-instance search, each target image's nearest neighbours in turn "
            "(default); topk: the top scores only; cluster: k-means on the pool, keep the clusters the "
            "target falls into",
        },
    )
    # The defaults below were chosen by benchmarks/retrieval_quality.py (see index/strategies.py).
    balance: str = field(
        default="class",
        metadata={
            "choices": BALANCES,
            "help": "split the budget evenly over classes (default), each class's share over its images, "
            "or over target images regardless of class",
        },
    )
    topk_share: float = field(  # of the instance strategy's budget
        default=0.5,
        metadata={
            "help": "with --strategy instance, the fraction of the budget filled by the top scores (per "
            "class with --balance class), the rest by the round robin over target images (default: "
            "%(default)s; 0 is SEPT's pure per-instance search). The defaults were chosen by "
            "benchmarks/retrieval_quality.py"
        },
    )
    min_similarity: float | None = field(default=None, metadata={"help": "never select below this cosine similarity"})
    near_dup_threshold: float | None = field(
        default=None,
        metadata={"help": "keep one of pool images at least this similar to each other (default: off)"},
    )
    leakage_guard: bool = field(
        default=True,
        metadata={
            "help": "exclude pool images close to the target's val/test images (default: on; "
            "--no-leakage-guard turns the guard off)"
        },
    )
    # cosine; distinct images of one class reach ~0.975 with the demo encoder, copies ~0.998
    leakage_threshold: float = field(
        default=0.97,
        metadata={"help": "exclude pool images this similar to a target val/test image (default: %(default)s)"},
    )
    clusters: int | None = field(
        default=None,
        metadata={"help": "k-means clusters for --strategy cluster (default: sqrt of the pool size)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the k-means (the other strategies are exact)"})
    # how, not what: these never change the selection
    ray_address: str | None = None
    searchers: int | None = field(
        default=None,
        metadata={"help": "searcher actors (default: one per index shard, at most the cluster's CPUs)"},
    )
    memory_per_searcher: str | int | None = field(
        default=None,
        metadata={
            "metavar": "SIZE",
            "help": "memory a searcher may hold, e.g. 8GB; shards that do not fit are searched in waves",
        },
    )
    query_batch: int = field(default=DEFAULT_QUERY_BATCH, metadata={"help": "queries per batch sent to the searchers"})


@dataclass
class _Task:
    spec: TaskSpec
    classes: list[str]
    query_refs: list[str]
    query_names: list[str]
    query_class: np.ndarray
    heldout_refs: list[str]
    heldout: int = 0
    xq: np.ndarray | None = None
    xh: np.ndarray | None = None


def _as_list(value) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_options(cfg: SelectConfig) -> None:
    if cfg.strategy not in STRATEGIES:
        raise SeptError(f"--strategy {cfg.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if cfg.balance not in BALANCES:
        raise SeptError(f"--balance {cfg.balance!r} is unknown; use one of {', '.join(BALANCES)}")
    for name, value in (
        ("--min-similarity", cfg.min_similarity),
        ("--near-dup-threshold", cfg.near_dup_threshold),
        ("--leakage-threshold", cfg.leakage_threshold),
    ):
        if value is not None and not -1.0 <= value <= 1.0:
            raise SeptError(f"{name} {value} is not a cosine similarity in [-1, 1]")
    if not 0.0 <= cfg.topk_share <= 1.0:
        raise SeptError(f"--topk-share {cfg.topk_share} is not a fraction in [0, 1]")
    if cfg.clusters is not None and cfg.clusters < 1:
        raise SeptError(f"--clusters must be at least 1, got {cfg.clusters}")
    if not cfg.out:
        raise SeptError("no --out folder given")


def select(cfg: SelectConfig) -> dict:
    """Select every task of ``cfg`` into ``cfg.out``; returns a summary per task and of the shards."""
    from sept.data.targets import load_target
    from sept.training.encoder import load_encoder

    started = time.time()
    _check_options(cfg)
    store = IndexStore.open(cfg.index)
    attrs = store.attrs
    if not attrs.get("complete"):
        raise SeptError(f"index {cfg.index} is incomplete; rerun `sept index`")
    ntotal = int(attrs["ntotal"])
    specs = resolve_tasks(_as_list(cfg.target), _as_list(cfg.task), cfg.budget, cfg.tasks_file, ntotal=ntotal)
    encoder = load_encoder(cfg.encoder)
    require_same_encoder(
        attrs,
        identity=encoder.identity,
        arch=encoder.arch,
        dim=encoder.dim,
        source=f"queries embedded by {cfg.encoder}",
        index_path=cfg.index,
    )
    n_clusters = cfg.clusters or int(max(2, min(65536, round(math.sqrt(ntotal)))))
    if cfg.strategy == "cluster" or cfg.near_dup_threshold is not None:
        _embeddings(attrs, cfg)  # fail before any work if the vectors these need are gone

    # Every target is read and checked before anything is written.
    tasks = []
    for spec in specs:
        target = load_target(spec.target, name=spec.name)
        refs = [ref for ref, _ in target.train]
        tasks.append(
            _Task(
                spec=spec,
                classes=target.classes,
                query_refs=refs,
                query_names=[os.path.relpath(r, spec.target) for r in refs],
                query_class=np.asarray(target.labels("train"), np.int64),
                heldout_refs=heldout_refs(spec.target, [ref for ref, _ in target.val]),
            )
        )

    out = os.path.abspath(cfg.out)
    shared = dict(
        index=store.path,
        index_spec=attrs["spec"],
        embeddings=attrs["embeddings"]["fingerprint"],
        encoder=encoder.identity,
    )
    os.makedirs(out, exist_ok=True)
    with writer_lock(out):
        files.claim_selection(out, shared, cfg.out)
        for t in tasks:
            files.claim_task(out, t.spec.name, _task_config(cfg, t.spec, n_clusters), cfg.out)
        pending = [t for t in tasks if not files.task_is_chosen(out, t.spec.name)]
        union = _union_of_choices(out, exclude={t.spec.name for t in pending})
        shards_dir = os.path.join(out, files.SHARDS_DIR)
        held = set(read_catalog(shards_dir).rows)
        needs_ray = bool(pending) or bool(union - held)
        summaries: dict[str, dict] = {}
        with ray_session(cfg.ray_address) if needs_ray else nullcontext():
            if pending:
                from sept.data.targets import load_image_refs

                log.info("select: embedding %d task(s)' target images", len(pending))
                for t in pending:
                    t.xq = encoder.embed_images(load_image_refs(t.query_refs))
                    refs = t.heldout_refs if cfg.leakage_guard else []
                    t.heldout = len(refs)
                    t.xh = (
                        encoder.embed_images(load_image_refs(refs)) if refs else np.zeros((0, encoder.dim), np.float32)
                    )
                summaries.update(_choose_tasks(cfg, store, attrs, pending, n_clusters, out))
            union = _union_of_choices(out)
            pool = attrs["pool"]
            materialize(np.asarray(sorted(union), np.int64), pool, shards_dir)
        catalog = read_catalog(shards_dir)
        for name in files.tasks_in(out):
            _write_manifest(out, name, catalog)
    for t in tasks:
        summaries.setdefault(
            t.spec.name, files.read_json(os.path.join(files.task_dir(out, t.spec.name), files.TASK_FILE))["summary"]
        )
    copied = len(union - held)
    log.info(
        "select: %d task(s), %d samples in %d shared shards (%d copied now) in %.1fs",
        len(tasks),
        len(catalog.rows),
        len(catalog.parts),
        copied,
        time.time() - started,
    )
    return dict(
        tasks=summaries,
        out=out,
        samples=len(union),
        copied=copied,
        shards=sorted(catalog.parts),
        seconds=round(time.time() - started, 1),
    )


def _topk_share(cfg: SelectConfig) -> float | None:
    """The share of the budget given to top scores: a setting of the instance strategy only."""
    return cfg.topk_share if cfg.strategy == "instance" else None


def _task_config(cfg: SelectConfig, spec: TaskSpec, n_clusters: int) -> dict:
    """What decides a task's selection (and nothing that only decides how it is computed)."""
    return dict(
        target=spec.target,
        budget=spec.budget,
        strategy=cfg.strategy,
        balance=cfg.balance,
        topk_share=_topk_share(cfg),
        min_similarity=cfg.min_similarity,
        near_dup_threshold=cfg.near_dup_threshold,
        leakage_guard=cfg.leakage_guard,
        leakage_threshold=cfg.leakage_threshold if cfg.leakage_guard else None,
        clusters=n_clusters if cfg.strategy == "cluster" else None,
        seed=cfg.seed if cfg.strategy == "cluster" else None,
    )


def _union_of_choices(out: str, exclude: set[str] = frozenset()) -> set[int]:
    ids: set[int] = set()
    for name in files.tasks_in(out):
        if name not in exclude:
            ids.update(
                int(r["id"]) for r in files.read_jsonl(os.path.join(files.task_dir(out, name), files.CHOICE_FILE))
            )
    return ids


def _embeddings(attrs: dict, cfg: SelectConfig):
    from sept.index.embedding_store import EmbeddingStore

    path = attrs["embeddings"]["path"]
    if not os.path.exists(os.path.join(path, "zarr.json")):
        why = "--strategy cluster" if cfg.strategy == "cluster" else "--near-dup-threshold"
        raise SeptError(f"{why} reads the pool's embeddings, but the store {path} the index was built from is gone")
    return EmbeddingStore.open(path)


def _effective_queries(t: _Task, balance: str) -> int:
    """Queries sharing the budget evenly: with class balance, the smallest class's images carry the largest share."""
    if balance != "class":
        return len(t.query_class)
    counts = np.bincount(t.query_class)
    counts = counts[counts > 0]
    return int(counts.min() * len(counts))


def _choose_tasks(
    cfg: SelectConfig, store: IndexStore, attrs: dict, tasks: list[_Task], n_clusters: int, out: str
) -> dict[str, dict]:
    ntotal = int(attrs["ntotal"])
    search_based = cfg.strategy != "cluster"
    k = {
        t.spec.name: neighbours_needed(t.spec.budget, _effective_queries(t, cfg.balance), ntotal) if search_based else 0
        for t in tasks
    }
    k_leak = {t.spec.name: min(ntotal, LEAK_NEIGHBOURS) if len(t.xh) else 0 for t in tasks}
    centroids = None
    if cfg.strategy == "cluster":
        emb = _embeddings(attrs, cfg)
        sample = emb.sample(max(n_clusters * 64, 20_000), seed=cfg.seed)
        log.info("select: k-means of %d pool embeddings into %d clusters", len(sample), n_clusters)
        centroids = train_clusters(sample, n_clusters, seed=cfg.seed)
    with SearcherPool(store.path, cfg.memory_per_searcher) as pool:
        return _search_and_choose(cfg, store, attrs, tasks, n_clusters, out, k, k_leak, centroids, pool)


def _search_and_choose(
    cfg: SelectConfig,
    store: IndexStore,
    attrs: dict,
    tasks: list[_Task],
    n_clusters: int,
    out: str,
    k: dict[str, int],
    k_leak: dict[str, int],
    centroids: np.ndarray | None,
    pool: SearcherPool,
) -> dict[str, dict]:
    """Search for every task still to do, choose; tasks that need more neighbours go round again."""
    ntotal, metric = int(attrs["ntotal"]), attrs["metric"]
    search_based = cfg.strategy != "cluster"
    todo = list(tasks)
    summaries = {}
    searches = 0
    while todo:
        blocks, owners = [], []
        for t in todo:
            if k[t.spec.name]:
                blocks.append(t.xq)
                owners.append((t.spec.name, "q", len(t.xq)))
            if k_leak[t.spec.name]:
                blocks.append(t.xh)
                owners.append((t.spec.name, "h", len(t.xh)))
        kk = max([k[t.spec.name] for t in todo] + [k_leak[t.spec.name] for t in todo])
        results: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        if blocks:
            stats = SearchStats()
            D, I = search_index(
                store.path,
                np.concatenate(blocks),
                kk,
                searchers=cfg.searchers,
                memory_per_searcher=cfg.memory_per_searcher,
                batch_size=cfg.query_batch,
                stats=stats,
                pool=pool,
            )
            searches += 1
            log.info(
                "select: searched %d queries of %d task(s), k=%d, in %.1fs (%d wave(s), %d restart(s))",
                len(D),
                len(todo),
                kk,
                stats.seconds,
                len(stats.waves),
                stats.restarts,
            )
            S = to_similarity(D, I, metric)
            row = 0
            for name, kind, n in owners:
                results[(name, kind)] = (S[row : row + n], I[row : row + n])
                row += n
        again = []
        for t in todo:
            name = t.spec.name
            leaked, incomplete = {}, False
            if k_leak[name]:
                Sh, Ih = results[(name, "h")]
                leaked, incomplete = leaked_ids(Sh[:, : k_leak[name]], Ih[:, : k_leak[name]], cfg.leakage_threshold)
            if incomplete and k_leak[name] < ntotal:
                k_leak[name] = min(ntotal, 2 * k_leak[name])
                again.append(t)
                continue
            if search_based:
                Sq, Iq = results[(name, "q")]
                Sq, Iq = Sq[:, : k[name]], Iq[:, : k[name]]
                near_dup = _near_dup_filter(cfg, attrs, Iq)
                choice = choose(
                    Sq,
                    Iq,
                    t.spec.budget,
                    strategy=cfg.strategy,
                    balance=cfg.balance,
                    query_class=t.query_class,
                    min_similarity=cfg.min_similarity,
                    excluded=set(leaked),
                    near_dup=near_dup,
                    topk_share=_topk_share(cfg) or 0.0,
                )
                if choice.needs_more_neighbours and kk < ntotal:
                    # The search returned kk neighbours per image (the largest k of any task): search
                    # again with twice what was searched, never with a k already searched.
                    k[name] = min(ntotal, 2 * kk)
                    log.info(
                        "select: task %s needs more than the %d neighbours per target image searched; "
                        "searching again with k=%d",
                        name,
                        kk,
                        k[name],
                    )
                    again.append(t)
                    continue
                neighbours = query_neighbours(choice, Sq, Iq, len(t.xq), NEIGHBOURS_SHOWN)
                extra = dict(k=k[name])
            else:
                emb = _embeddings(attrs, cfg)
                # Not named `pool`: that is the searcher pool the next round's search still needs.
                pool_vectors = lambda emb=emb: ((x, ids) for _, x, ids in emb.iter_shards())  # noqa: E731
                near_dup = _near_dup_filter(cfg, attrs, None, emb=emb)
                choice, plan = choose_by_clusters(
                    centroids,
                    t.xq,
                    pool_vectors,
                    t.spec.budget,
                    query_class=t.query_class,
                    balance=cfg.balance,
                    min_similarity=cfg.min_similarity,
                    excluded=set(leaked),
                    near_dup=near_dup,
                )
                neighbours = query_neighbours(choice, None, None, len(t.xq), NEIGHBOURS_SHOWN)
                extra = dict(
                    clusters=n_clusters,
                    clusters_kept=len(plan.weights),
                    cluster_probes=plan.probes,
                    cluster_members=plan.members,
                )
            summaries[name] = _write_choice(cfg, out, t, choice, neighbours, leaked, extra)
        todo = again
    log.info("select: %d task(s) chosen with %d search(es)", len(tasks), searches)
    return summaries


def _near_dup_filter(cfg: SelectConfig, attrs: dict, I: np.ndarray | None, emb=None) -> NearDuplicateFilter | None:
    if cfg.near_dup_threshold is None:
        return None
    emb = emb or _embeddings(attrs, cfg)
    if I is None:
        return NearDuplicateFilter(_LazyVectors(emb), cfg.near_dup_threshold, dim=emb.dim)
    candidates = np.unique(I[I >= 0])
    return NearDuplicateFilter(fetch_vectors(emb, candidates), cfg.near_dup_threshold, dim=emb.dim)


def fetch_vectors(emb, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Embeddings of these pool ids, reading only the pool shards that hold them."""
    out: dict[int, np.ndarray] = {}
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    shard_idx, _ = split_ids(ids)
    for s in np.unique(shard_idx).tolist():
        x, sids = emb.read_shard(int(s))
        wanted = ids[shard_idx == s]
        rows = np.searchsorted(sids, wanted)
        ok = (rows < len(sids)) & (sids[np.minimum(rows, len(sids) - 1)] == wanted)
        for pid, r in zip(wanted[ok].tolist(), rows[ok].tolist()):
            out[pid] = x[r]
    return out


class _LazyVectors(dict):
    """Embeddings fetched a pool shard at a time, on first use (the cluster strategy's candidates are not known up front)."""

    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.loaded: set[int] = set()

    def __missing__(self, pid: int) -> np.ndarray:
        s = int(split_ids([pid])[0][0])
        if s in self.loaded:
            raise KeyError(pid)
        self.loaded.add(s)
        x, sids = self.emb.read_shard(s)
        for i, v in zip(sids.tolist(), x):
            self[int(i)] = v
        return self[pid]


def _write_choice(
    cfg: SelectConfig, out: str, t: _Task, choice: Choice, neighbours, leaked: dict[int, tuple[int, float]], extra: dict
) -> dict:
    names, classes = t.query_names, t.classes
    cls_of = [classes[c] for c in t.query_class.tolist()]
    rows = [
        dict(
            id=int(pid),
            score=float(score),
            chosen_by=names[q],
            cls=cls_of[q],
            retrieved_by=[names[r] for r in retrievers],
        )
        for pid, score, q, retrievers in zip(
            choice.ids.tolist(), choice.scores.tolist(), choice.chosen_by.tolist(), choice.retrieved_by
        )
    ]
    queries = [
        dict(image=names[q], ref=t.query_refs[q], cls=cls_of[q], neighbours=[[int(i), float(s)] for i, s in nb])
        for q, nb in enumerate(neighbours)
    ]
    images = np.bincount(t.query_class, minlength=len(classes))
    chosen = (
        np.bincount(t.query_class[choice.chosen_by], minlength=len(classes))
        if len(choice)
        else np.zeros(len(classes), int)
    )
    if cfg.balance == "class":
        share = np.full(len(classes), t.spec.budget / max(1, int((images > 0).sum())))
    else:
        share = t.spec.budget * images / max(1, images.sum())
    summary = dict(
        task=t.spec.name,
        budget=t.spec.budget,
        selected=len(choice),
        queries=len(names),
        strategy=cfg.strategy,
        balance=cfg.balance,
        topk_share=_topk_share(cfg),
        min_similarity=cfg.min_similarity,
        scores=dict(
            min=float(choice.scores.min()) if len(choice) else None,
            max=float(choice.scores.max()) if len(choice) else None,
            mean=float(choice.scores.mean()) if len(choice) else None,
        ),
        per_class={
            classes[c]: dict(images=int(images[c]), share=round(float(share[c]), 2), selected=int(chosen[c]))
            for c in range(len(classes))
        },
        duplicates=dict(
            retrieved_by_several=int(sum(len(r) > 1 for r in choice.retrieved_by)),
            near_dup_threshold=cfg.near_dup_threshold,
            near_duplicates_dropped=len(choice.near_duplicates),
        ),
        leakage=dict(
            enabled=cfg.leakage_guard,
            threshold=cfg.leakage_threshold if cfg.leakage_guard else None,
            heldout_images=t.heldout,
            pool_matches=len(leaked),
            skipped=choice.leaked_skipped,
        ),
        **extra,
    )
    if len(leaked) > 10 * max(1, t.heldout):
        log.warning(
            "select: task %s: %d pool samples are within %.3f of its %d held-out images; the encoder may "
            "not tell images apart at that similarity: consider a higher --leakage-threshold",
            t.spec.name,
            len(leaked),
            cfg.leakage_threshold,
            t.heldout,
        )
    if len(choice) < t.spec.budget:
        log.warning(
            "select: task %s got %d of its budget %d (similarity floor, leakage guard or a small pool)",
            t.spec.name,
            len(choice),
            t.spec.budget,
        )
    folder = files.task_dir(out, t.spec.name)
    config = files.read_json(os.path.join(folder, files.TASK_FILE))["config"]
    files.write_jsonl(os.path.join(folder, files.QUERIES_FILE), queries)
    shard_idx, positions = split_ids(np.asarray(sorted(leaked), np.int64))
    files.write_jsonl(
        os.path.join(folder, files.LEAKAGE_FILE),
        [
            dict(
                id=pid,
                source_index=int(s),
                position=int(p),
                heldout=os.path.relpath(t.heldout_refs[leaked[pid][0]], t.spec.target),
                similarity=leaked[pid][1],
            )
            for pid, s, p in zip(sorted(leaked), shard_idx.tolist(), positions.tolist())
        ],
    )
    files.write_json(os.path.join(folder, files.TASK_FILE), dict(config=config, summary=summary))
    files.write_jsonl(os.path.join(folder, files.CHOICE_FILE), rows)  # last: its presence means chosen
    log.info(
        "select: task %s: %d chosen, %d leaked pool samples skipped, %d near-duplicates dropped",
        t.spec.name,
        len(choice),
        choice.leaked_skipped,
        len(choice.near_duplicates),
    )
    return summary


def _write_manifest(out: str, name: str, catalog) -> None:
    folder = files.task_dir(out, name)
    choice = files.read_jsonl(os.path.join(folder, files.CHOICE_FILE))
    manifest, parts = [], {}
    for row in choice:
        where = catalog.rows[int(row["id"])]
        parts[where["shard"]] = catalog.parts[where["shard"]]
        manifest.append(
            dict(
                row,
                key=where["key"],
                shard=where["shard"],
                source_shard=where["source_shard"],
                position=where["position"],
                sha256=where["sha256"],
            )
        )
    files.write_json(os.path.join(folder, files.SHARDS_FILE), dict(sorted(parts.items())))
    files.write_jsonl(os.path.join(folder, files.MANIFEST), manifest)
