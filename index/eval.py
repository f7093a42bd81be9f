"""sept index eval: recall and speed of an index against exact search, over a sweep of nprobe.

It reads a sample of the index shards, not all of them: ``--eval-shards`` of them (all when
there are no more), drawn by the seed, so a rerun uses the same ones; the report names them. The
evaluation is then of the index those shards form: queries are drawn from, and exact search runs
over, the pool shards they hold. Every index shard shares the trained quantizer and differs only
in which vectors it holds, so their recall estimates the whole index's at a fraction of the reads.

Queries are held out by leaving one out: a random sample of the indexed vectors, each removed
from its own results, in the exact and the approximate search alike. Exact search streams the
stored (float16) vectors batch by batch, so it needs no more memory than one batch. The
approximate search is the index exactly as `sept select` uses it: each (sampled) shard searched,
the per-shard top-k merged. recall@k is the mean overlap of the approximate and exact top-k,
|approx_k ∩ exact_k| / k. The chosen nprobe, the smallest reaching the target recall@10, is
stored with the index; `sept select` uses it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from sept.errors import SeptError
from sept.index.embedding_store import EmbeddingStore
from sept.index.merge import merge_topk
from sept.index.store import IndexStore
from sept.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    index: str
    embeddings: str
    queries: int = field(default=1000, metadata={"help": "eval: held-out queries"})
    k: int = field(default=10, metadata={"help": "eval: recall@k"})
    nprobes: list[int] = field(
        default_factory=list,
        metadata={
            "flag": "--nprobe-sweep",
            "sep": ",",
            "help": "eval: comma-separated nprobe values (default: powers of two up to min(nlist, 256))",
        },
    )
    target_recall: float = field(
        default=0.95,
        metadata={"help": "eval: the chosen nprobe is the smallest reaching this recall@k (default: %(default)s)"},
    )
    eval_shards: int = field(
        default=4,
        metadata={"help": "eval: index shards read, a sample drawn by the seed (0: all of them)"},
    )
    seed: int = 0
    out: str = ""  # the JSON table; "" means INDEX/eval.json
    batch_rows: int = 65536


def exact_knn(xq: np.ndarray, batches, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of xq over (vectors, ids) batches; memory is one batch plus the (nq, k) heap."""
    heap = faiss.ResultHeap(len(xq), k, keep_max=(metric == "ip"))
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    for xb, ids in batches:
        D, I = faiss.knn(xq, np.ascontiguousarray(xb, dtype=np.float32), min(k, len(xb)), faiss_metric)
        D = np.ascontiguousarray(D, dtype=np.float32)
        I = np.where(I >= 0, ids[np.maximum(I, 0)], -1).astype(np.int64)
        if D.shape[1] < k:  # a batch smaller than k: pad with results that always lose
            pad = k - D.shape[1]
            D = np.hstack([D, np.full((len(xq), pad), -np.inf if metric == "ip" else np.inf, np.float32)])
            I = np.hstack([I, np.full((len(xq), pad), -1, np.int64)])
        heap.add_result(D, I)
    heap.finalize()
    return heap.D, heap.I


def drop_self(I: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row of I without the query's own id, cut to k (leave-one-out)."""
    out = np.full((len(I), k), -1, np.int64)
    for row, (ids, own) in enumerate(zip(I, query_ids)):
        kept = ids[ids != own][:k]
        out[row, : len(kept)] = kept
    return out


def recall_at(I_approx: np.ndarray, I_exact: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries."""
    hits = [len(np.intersect1d(a[:k][a[:k] >= 0], e[:k][e[:k] >= 0])) for a, e in zip(I_approx, I_exact)]
    return float(np.mean(hits) / k) if hits else 0.0


def sample_shards(nshards: int, size: int, seed: int) -> list[int]:
    """``size`` of the index shards 0..nshards-1 (all of them when size is 0 or at least nshards),
    drawn without replacement by seed, in order."""
    if size <= 0 or size >= nshards:
        return list(range(nshards))
    return sorted(int(j) for j in np.random.default_rng(seed).choice(nshards, size=size, replace=False))


def _check_embeddings(
    store: IndexStore, emb: EmbeddingStore, index_path: str, emb_path: str, pool_shards: list[int] | None = None
) -> list[int]:
    """The pool shards the index holds (of them, pool_shards), after checking emb holds them
    unchanged, from the same encoder."""
    attrs = store.attrs
    if emb.encoder.identity != attrs["encoder"]["identity"] or emb.dim != int(attrs["dim"]):
        raise SeptError(
            f"embeddings {emb_path} come from encoder {emb.encoder.identity} ({emb.dim}-d), but index {index_path} "
            f"was built from encoder {attrs['encoder']['identity']} ({attrs['dim']}-d)"
        )
    counts = {int(i): int(c) for i, c in attrs.get("indexed_counts", {}).items()}
    if pool_shards is not None:
        counts = {i: counts[i] for i in pool_shards}
    for i, count in counts.items():
        if (
            i >= len(emb.pool)
            or emb.pool[i] != attrs["pool"][i]
            or not emb.is_complete(i)
            or emb.shard_count(i) != count
        ):
            raise SeptError(
                f"embeddings {emb_path} do not hold the vectors index {index_path} was built from "
                f"(pool shard {attrs['pool'][i]} differs or is missing)"
            )
    return sorted(counts)


def evaluate_index(cfg: EvalConfig) -> dict:
    """Sweep nprobe, measure recall@1/@k and QPS against exact search, store the chosen nprobe."""
    store = IndexStore.open(cfg.index)
    attrs = store.attrs
    if not attrs.get("complete"):
        raise SeptError(f"index {cfg.index} is incomplete; rerun `sept index` to finish it")
    emb = EmbeddingStore.open(cfg.embeddings)
    if cfg.queries < 1 or cfg.k < 1:
        raise SeptError(f"--queries and --k must be positive, got {cfg.queries} and {cfg.k}")
    if cfg.eval_shards < 0:
        raise SeptError(f"--eval-shards must be 0 (all) or positive, got {cfg.eval_shards}")
    assignment = attrs["assignment"]
    used = sample_shards(len(assignment), cfg.eval_shards, cfg.seed)
    shards = _check_embeddings(store, emb, cfg.index, cfg.embeddings, sorted(i for j in used for i in assignment[j]))
    searched = sum(int(attrs["indexed_counts"][str(i)]) for i in shards)
    log.info("index eval: %d of %d index shard(s) (%s), %d vectors", len(used), len(assignment), used, searched)
    metric = attrs["metric"]
    xq, qids = emb.sample_with_ids(cfg.queries, seed=cfg.seed, shard_indices=shards)
    nq, k = len(xq), cfg.k

    t0 = time.perf_counter()
    _, I_exact = exact_knn(xq, emb.iter_batches(shards, cfg.batch_rows), k + 1, metric)
    exact_s = time.perf_counter() - t0
    I_exact = drop_self(I_exact, qids, k)

    indexes = [store.load_shard(j) for j in used]
    ivf = faiss.try_extract_index_ivf(indexes[0])
    nlist = int(ivf.nlist) if ivf is not None else 0
    sweep = sorted(set(cfg.nprobes)) if cfg.nprobes else [p for p in (2**i for i in range(20)) if p <= min(nlist, 256)]
    if ivf is None:
        sweep = [0]  # not an IVF index: one row, nothing to probe
    elif any(p < 1 or p > nlist for p in sweep):
        raise SeptError(f"nprobe values must lie in [1, {nlist}] for index {cfg.index}; got {sweep}")
    rows = []
    for nprobe in sweep:
        if nprobe:
            for index in indexes:
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        t0 = time.perf_counter()
        D, I = merge_topk([index.search(xq, k + 1) for index in indexes], k + 1, metric=metric)
        seconds = time.perf_counter() - t0
        I = drop_self(I, qids, k)
        rows.append(
            dict(
                nprobe=nprobe or None,
                recall_at_1=recall_at(I, I_exact, 1),
                recall_at_k=recall_at(I, I_exact, k),
                qps=nq / seconds if seconds > 0 else float("inf"),
            )
        )
    chosen, rule = _choose(rows, cfg.target_recall, k)
    result = dict(
        index=store.path,
        embeddings=emb.path,
        factory=attrs["spec"]["factory"],
        ntotal=int(attrs["ntotal"]),
        shards_used=used,
        shards_total=len(assignment),
        searched_vectors=searched,
        queries=nq,
        k=k,
        metric=metric,
        threads=faiss.omp_get_max_threads(),
        exact=dict(qps=nq / exact_s if exact_s > 0 else float("inf"), seconds=exact_s),
        rows=rows,
        target_recall=cfg.target_recall,
        chosen_nprobe=chosen,
        rule=rule,
        config=asdict(cfg),
    )
    out = cfg.out or os.path.join(store.path, "eval.json")
    atomic_write_json(out, result)
    result["json"] = out
    if chosen is not None:
        store.update_attrs(nprobe=chosen, nprobe_reason=rule, eval=out)
    log.info("index eval: %s", rule)
    return result


def _choose(rows: list[dict], target: float, k: int) -> tuple[int | None, str]:
    if rows[0]["nprobe"] is None:
        return None, "not an IVF index: there is no nprobe to choose"
    for row in rows:
        if row["recall_at_k"] >= target:
            return row["nprobe"], f"nprobe {row['nprobe']}: the smallest reaching recall@{k} >= {target}"
    best = max(rows, key=lambda r: (r["recall_at_k"], -r["nprobe"]))
    return best["nprobe"], (
        f"nprobe {best['nprobe']}: no nprobe reached recall@{k} >= {target}; "
        f"this one gave the best, {best['recall_at_k']:.3f}"
    )


def format_eval_table(result: dict) -> str:
    k = result["k"]
    used, total = result["shards_used"], result["shards_total"]
    which = f"all {total}" if len(used) == total else ", ".join(map(str, used)) + f" of {total}"
    lines = [
        f"index {result['index']} ({result['factory']}, {result['ntotal']} vectors; index shard(s) {which} "
        f"searched, {result['searched_vectors']} vectors): {result['queries']} held-out queries, "
        f"{result['threads']} thread(s)",
        f"{'nprobe':>8} {'recall@1':>9} {f'recall@{k}':>10} {'QPS':>10}",
    ]
    for row in result["rows"]:
        nprobe = "-" if row["nprobe"] is None else str(row["nprobe"])
        lines.append(f"{nprobe:>8} {row['recall_at_1']:>9.3f} {row['recall_at_k']:>10.3f} {row['qps']:>10.0f}")
    lines.append(f"{'exact':>8} {1.0:>9.3f} {1.0:>10.3f} {result['exact']['qps']:>10.0f}")
    lines.append(f"chosen: {result['rule']}; table written to {result['json']}")
    return "\n".join(lines)
