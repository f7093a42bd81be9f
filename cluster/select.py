"""sept select: the retrieval coordinator, from target tasks to one set of shared WebDataset shards.

For every task of the run it embeds the target's train images (the queries) and held-out images
(val/, test/: the leakage guard), searches the index once for all of them together
(``sept.cluster.search``), and chooses each task's samples (``sept.index.strategies``): SEPT's
per-instance round robin by default, class-balanced, global top-k or k-means clusters, with
dedup, an optional near-duplicate rule and the leakage guard. Each class is searched with its own
k, sized from its own share of the budget (with class balance a class of few images needs more
neighbours per image than a class of many); images whose k is alike are searched together. When
a task's neighbour lists turn out too short for its budget, only that task is searched again,
with k sized from its shortfall.

The union of every task's samples is materialized once into ``OUT/shards`` (samples already
there are not copied again), then each task gets its manifest. The folder's files are described
in ``sept.data.selection_folder``. A run resumes where it stopped: chosen tasks are not searched
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

from sept import storage
from sept.cluster.materialize import materialize
from sept.cluster.runtime import ray_session
from sept.cluster.search import SearcherPool, SearchStats, search_index
from sept.cluster.select_config import SelectConfig, as_list, check_select_config
from sept.cluster.task_record import SelectionTask, task_records
from sept.data import selection_folder as folder
from sept.data.task_list import TaskSpec, heldout_refs, resolve_tasks
from sept.errors import SeptError
from sept.index.budget import neighbours_needed, round_k
from sept.index.dedup import CandidateNearDuplicates, NearDuplicateFilter, leaked_ids, to_similarity
from sept.index.dedup_table import DedupTable
from sept.index.store import IndexStore
from sept.index.strategies import (
    NeighbourBlock,
    choose_blocks,
    choose_by_clusters,
    query_neighbours,
    train_clusters,
)
from sept.index.vector_lookup import LazyVectors, fetch_vector_array
from sept.training.encoder.identity import require_same_encoder

log = logging.getLogger(__name__)

LEAK_NEIGHBOURS = 32  # first look at each held-out image's 32 nearest pool samples; more if all are close
NEIGHBOURS_SHOWN = 16  # per target image, in queries.jsonl (what the report shows)


def select(cfg: SelectConfig) -> dict:
    """Select every task of ``cfg`` into ``cfg.out``; returns a summary per task and of the shards."""
    started = time.time()
    run = SelectionRun.open(cfg)
    storage.makedirs(run.out)
    with folder.writer_lock(run.out):
        pending = run.claim()
        union = folder.union_of_choices(run.out, exclude={t.name for t in pending})
        held = folder.read_catalog(run.shards).ids
        summaries: dict[str, dict] = {}
        with ray_session(cfg.ray_address) if pending or len(np.setdiff1d(union, held)) else nullcontext():
            if pending:
                run.embed_targets(pending)
                summaries.update(run.choose(pending))
            union = folder.union_of_choices(run.out)
            materialize(union, run.attrs["pool"], run.shards, timeout_s=cfg.copy_timeout_s)
        catalog = folder.read_catalog(run.shards)
        for name in folder.tasks_in(run.out):
            folder.write_manifest(run.out, name, catalog)
    for t in run.tasks:
        summaries.setdefault(t.name, folder.task_summary(run.out, t.name))
    copied = len(np.setdiff1d(union, held))
    log.info(
        "select: %d task(s), %d samples in %d shared shards (%d copied now) in %.1fs",
        len(run.tasks),
        len(catalog),
        len(catalog.parts),
        copied,
        time.time() - started,
    )
    return dict(
        tasks=summaries,
        out=run.out,
        samples=len(union),
        copied=copied,
        shards=sorted(catalog.parts),
        seconds=round(time.time() - started, 1),
    )


@dataclass
class SelectionRun:
    """One ``sept select`` call, its inputs checked: the index, the encoder, the tasks and the folder.

    ``choose`` searches the index for every pending task at once and chooses each; a task whose
    neighbour lists turn out too short (``k``: one per target image, alike within a class), or
    whose leakage guard has not seen every close pool sample (``k_leak``), goes round again alone
    with more neighbours.
    """

    cfg: SelectConfig
    store: IndexStore
    attrs: dict
    encoder: object
    tasks: list[SelectionTask]
    out: str
    n_clusters: int
    k: dict[str, np.ndarray] = field(default_factory=dict)
    k_leak: dict[str, int] = field(default_factory=dict)
    centroids: np.ndarray | None = None
    searches: int = 0
    dedup: DedupTable | None = None

    @classmethod
    def open(cls, cfg: SelectConfig) -> SelectionRun:
        """Check everything the run reads (options, index, encoder, every target) before anything is written."""
        from sept.data.targets import load_target
        from sept.training.encoder import load_encoder

        check_select_config(cfg)
        store = IndexStore.open(cfg.index)
        attrs = store.attrs
        if not attrs.get("complete"):
            raise SeptError(f"index {cfg.index} is incomplete; rerun `sept index`")
        ntotal = int(attrs["ntotal"])
        specs = resolve_tasks(as_list(cfg.target), as_list(cfg.task), cfg.budget, cfg.tasks_file, ntotal=ntotal)
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
        dedup = _dedup_table(attrs) if cfg.dedup else None
        tasks = []
        for spec in specs:
            target = load_target(spec.target, name=spec.name)
            refs = [ref for ref, _ in target.train]
            tasks.append(
                SelectionTask(
                    spec=spec,
                    classes=target.classes,
                    query_refs=refs,
                    query_names=[os.path.relpath(r, spec.target) for r in refs],
                    query_class=np.asarray(target.labels("train"), np.int64),
                    heldout_refs=heldout_refs(spec.target, [ref for ref, _ in target.val]),
                )
            )
        return cls(cfg, store, attrs, encoder, tasks, storage.resolve(cfg.out), n_clusters, dedup=dedup)

    @property
    def ntotal(self) -> int:
        return int(self.attrs["ntotal"])

    @property
    def shards(self) -> str:
        return folder.shards_dir(self.out)

    @property
    def search_based(self) -> bool:
        return self.cfg.strategy != "cluster"

    def claim(self) -> list[SelectionTask]:
        """Claim the folder and every task's config; return the tasks not chosen yet."""
        shared = dict(
            index=self.store.path,
            index_spec=self.attrs["spec"],
            embeddings=self.attrs["embeddings"]["fingerprint"],
            encoder=self.encoder.identity,
        )
        folder.claim_selection(self.out, shared, self.cfg.out)
        for t in self.tasks:
            folder.claim_task(self.out, t.name, self._task_config(t), self.cfg.out)
        return [t for t in self.tasks if not folder.task_is_chosen(self.out, t.name)]

    def embed_targets(self, tasks: list[SelectionTask]) -> None:
        from sept.data.targets import load_image_refs

        log.info("select: embedding %d task(s)' target images", len(tasks))
        for t in tasks:
            t.xq = self.encoder.embed_images(load_image_refs(t.query_refs))
            refs = t.heldout_refs if self.cfg.leakage_guard else []
            t.heldout = len(refs)
            t.xh = (
                self.encoder.embed_images(load_image_refs(refs))
                if refs
                else np.zeros((0, self.encoder.dim), np.float32)
            )

    def choose(self, tasks: list[SelectionTask]) -> dict[str, dict]:
        """Search, choose and record every task; tasks that need more neighbours go round again."""
        cfg = self.cfg
        self.k = {t.name: _neighbours_per_image(t, cfg.balance, self.ntotal) for t in tasks if self.search_based}
        self.k_leak = {t.name: min(self.ntotal, LEAK_NEIGHBOURS) if len(t.xh) else 0 for t in tasks}
        if cfg.strategy == "cluster":
            sample = _embeddings(self.attrs, cfg).sample(max(self.n_clusters * 64, 20_000), seed=cfg.seed)
            log.info("select: k-means of %d pool embeddings into %d clusters", len(sample), self.n_clusters)
            self.centroids = train_clusters(sample, self.n_clusters, seed=cfg.seed)
        summaries: dict[str, dict] = {}
        todo = list(tasks)
        with SearcherPool(self.store.path, cfg.memory_per_searcher) as searchers:
            while todo:
                results = self._search(todo, searchers)
                again = []
                for t in todo:
                    summary = self._choose_one(t, results)
                    if summary is None:
                        again.append(t)
                    else:
                        summaries[t.name] = summary
                todo = again
        log.info("select: %d task(s) chosen with %d search(es)", len(tasks), self.searches)
        return summaries

    def _search(self, todo: list[SelectionTask], searchers: SearcherPool) -> dict:
        """Search the index for every query (and held-out) image of ``todo``: one search for each k
        asked for, every image of every task with that k in it. Returns per task its queries'
        results as a ``NeighbourBlock`` per class (the rows of a class are contiguous in the search,
        so a block is a view), and its held-out images' (S, I)."""
        wanted: dict[int, list[tuple[SelectionTask, str, np.ndarray]]] = {}
        for t in todo:
            if t.name in self.k:
                for k in np.unique(self.k[t.name]).tolist():
                    rows = np.flatnonzero(self.k[t.name] == k)
                    if self.cfg.balance == "class":  # class by class, each class's rows ascending
                        rows = rows[np.argsort(t.query_class[rows], kind="stable")]
                    wanted.setdefault(k, []).append((t, "q", rows))
            if self.k_leak[t.name]:
                wanted.setdefault(self.k_leak[t.name], []).append((t, "h", np.arange(len(t.xh))))
        results: dict[tuple[str, str], list] = {}
        for k, parts in sorted(wanted.items()):
            images = [(t.xq if kind == "q" else t.xh)[rows] for t, kind, rows in parts]
            S, I = self._search_once(images, k, len({t.name for t, _, _ in parts}), searchers)
            row = 0
            for t, kind, rows in parts:
                Sp, Ip = S[row : row + len(rows)], I[row : row + len(rows)]
                row += len(rows)
                if kind == "h":
                    results[(t.name, "h")] = [(Sp, Ip)]
                    continue
                classes = t.query_class[rows] if self.cfg.balance == "class" else np.zeros(len(rows))
                edges = np.flatnonzero(np.diff(classes)) + 1
                for a, b in zip([0, *edges.tolist()], [*edges.tolist(), len(rows)]):  # a class's rows, ascending
                    results.setdefault((t.name, "q"), []).append(NeighbourBlock(rows[a:b], Sp[a:b], Ip[a:b]))
        for t in todo:  # class order, whatever the order of the searches: a choice is a function of its inputs
            if (t.name, "q") in results:
                results[(t.name, "q")].sort(key=lambda block, t=t: int(t.query_class[block.rows[0]]))
        return results

    def _search_once(
        self, blocks: list[np.ndarray], k: int, tasks: int, searchers: SearcherPool
    ) -> tuple[np.ndarray, np.ndarray]:
        stats = SearchStats()
        D, I = search_index(
            self.store.path,
            np.concatenate(blocks),
            k,
            searchers=self.cfg.searchers,
            memory_per_searcher=self.cfg.memory_per_searcher,
            batch_size=self.cfg.query_batch,
            stats=stats,
            pool=searchers,
        )
        self.searches += 1
        log.info(
            "select: searched %d queries of %d task(s), k=%d, in %.1fs (%d wave(s), %d restart(s))",
            len(D),
            tasks,
            k,
            stats.seconds,
            len(stats.waves),
            stats.restarts,
        )
        return to_similarity(D, I, self.attrs["metric"]), I

    def _choose_one(self, t: SelectionTask, results: dict) -> dict | None:
        """Choose and record task ``t`` from the search's results; None if it must be searched again."""
        cfg, name, ntotal = self.cfg, t.name, self.ntotal
        leaked, incomplete = {}, False
        if self.k_leak[name]:
            ((Sh, Ih),) = results[(name, "h")]
            leaked, incomplete = leaked_ids(Sh, Ih, cfg.leakage_threshold)
        if incomplete and self.k_leak[name] < ntotal:
            self.k_leak[name] = min(ntotal, 2 * self.k_leak[name])
            return None
        if self.search_based:
            blocks = results[(name, "q")]
            k = self.k[name]
            choice = choose_blocks(
                blocks,
                t.spec.budget,
                strategy=cfg.strategy,
                balance=cfg.balance,
                query_class=t.query_class,
                min_similarity=cfg.min_similarity,
                excluded=set(leaked),
                near_dup=_near_dup_filter(cfg, self.attrs, blocks),
                topk_share=_topk_share(cfg) or 0.0,
                removed=self.removed,
            )
            if choice.needs_more_neighbours and k.min() < ntotal:
                # The next k is sized from the shortfall the choice showed (duplicates between
                # images, leaked and near-duplicate samples all shrink what k neighbours give),
                # with a quarter more for the estimate's error: one more search, rarely two.
                grown = np.ceil(1.25 * k * choice.neighbours_factor).astype(np.int64)
                self.k[name] = np.array([round_k(g, ntotal) for g in np.maximum(2 * k, grown).tolist()])
                log.info(
                    "select: task %s needs more than the %d neighbours per target image searched; "
                    "searching again with k=%d",
                    name,
                    int(k.max()),
                    int(self.k[name].max()),
                )
                return None
            neighbours = query_neighbours(choice, blocks, len(t.xq), NEIGHBOURS_SHOWN)
            extra = dict(k=int(k.max()), k_per_class=_k_per_class(t, k))
        else:
            emb = _embeddings(self.attrs, cfg)
            choice, plan = choose_by_clusters(
                self.centroids,
                t.xq,
                lambda: ((x, ids) for _, x, ids in emb.iter_shards()),
                t.spec.budget,
                query_class=t.query_class,
                balance=cfg.balance,
                min_similarity=cfg.min_similarity,
                excluded=set(leaked),
                near_dup=_near_dup_filter(cfg, self.attrs, None, emb=emb),
                removed=self.removed,
            )
            neighbours = query_neighbours(choice, None, len(t.xq), NEIGHBOURS_SHOWN)
            extra = dict(
                clusters=self.n_clusters,
                clusters_kept=len(plan.weights),
                cluster_probes=plan.probes,
                cluster_members=plan.members,
            )
        records = task_records(
            t, choice, neighbours, leaked, settings=self._task_config(t), extra=extra, dedup=self.dedup
        )
        folder.write_task_records(
            self.out,
            name,
            queries=records.queries,
            leakage=records.leakage,
            summary=records.summary,
            choice=records.choice,
        )
        log.info(
            "select: task %s: %d chosen, %d leaked pool samples skipped, %d near-duplicates dropped",
            name,
            len(choice),
            choice.leaked_skipped,
            len(choice.near_duplicates),
        )
        return records.summary

    @property
    def removed(self) -> np.ndarray | None:
        return None if self.dedup is None else self.dedup.removed

    def _task_config(self, t: SelectionTask) -> dict:
        config = _task_config(self.cfg, t.spec, self.n_clusters)
        config["dedup"] = None if self.dedup is None else dict(self.dedup.attrs["settings"], removed=len(self.dedup))
        return config


def _dedup_table(attrs: dict) -> DedupTable | None:
    """The pool's dedup table, if ``sept dedup`` wrote one for the embeddings this index holds."""
    return DedupTable.read(attrs["embeddings"]["path"], fingerprint=attrs["embeddings"]["fingerprint"])


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


def _embeddings(attrs: dict, cfg: SelectConfig):
    from sept.index.embedding_store import EmbeddingStore

    path = attrs["embeddings"]["path"]
    if not storage.exists(storage.join(path, "zarr.json")):
        why = "--strategy cluster" if cfg.strategy == "cluster" else "--near-dup-threshold"
        raise SeptError(f"{why} reads the pool's embeddings, but the store {path} the index was built from is gone")
    return EmbeddingStore.open(path)


def _neighbours_per_image(t: SelectionTask, balance: str, ntotal: int) -> np.ndarray:
    """The k of each of the task's images: its share of the budget twice over (``neighbours_needed``).
    With class balance every class has an equal share of the budget, split over its own images, so
    each class gets its own k; otherwise every image has the same share."""
    if balance != "class":
        return np.full(
            len(t.query_class), round_k(neighbours_needed(t.spec.budget, len(t.query_class), ntotal), ntotal)
        )
    classes, inverse, counts = np.unique(t.query_class, return_inverse=True, return_counts=True)
    share = math.ceil(t.spec.budget / len(classes))
    k_of_class = np.array([round_k(neighbours_needed(share, int(n), ntotal), ntotal) for n in counts])
    return k_of_class[inverse]


def _k_per_class(t: SelectionTask, k: np.ndarray) -> dict[str, int]:
    return {t.classes[c]: int(k[t.query_class == c].max()) for c in np.unique(t.query_class).tolist()}


def _near_dup_filter(
    cfg: SelectConfig, attrs: dict, blocks: list[NeighbourBlock] | None, emb=None
) -> NearDuplicateFilter | CandidateNearDuplicates | None:
    """The near-duplicate rule, if asked for: among the search's candidates (``blocks``), or, for the
    cluster strategy (None), against every vector accepted so far."""
    if cfg.near_dup_threshold is None:
        return None  # before anything is gathered: the candidates' ids are a copy of the search results
    emb = emb or _embeddings(attrs, cfg)
    if blocks is None:
        return NearDuplicateFilter(LazyVectors(emb), cfg.near_dup_threshold, dim=emb.dim)
    candidates = np.unique(np.concatenate([np.unique(b.I[b.I >= 0]) for b in blocks]))
    return CandidateNearDuplicates(*fetch_vector_array(emb, candidates), cfg.near_dup_threshold)
