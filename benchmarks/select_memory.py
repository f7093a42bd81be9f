"""Benchmark: the selection coordinator's memory and time per selected sample, as the budget grows.

    .venv/bin/python benchmarks/select_memory.py

What ``sept select`` holds in its driver after the search for one task: the merged search results
(S, I: nq x k), then the choice (streams, fill, retrievers), each query's neighbours for the
report, and the task's files (choice.jsonl, queries.jsonl) written to a scratch selection folder.
Synthetic results stand in for the search (each query's neighbours drawn around its own pool
region, so queries share neighbours as real ones do); the search itself is select_search.py's.

For each budget (queries fixed) it prints the peak Python-traced memory above the search results
(numpy arrays are traced too), in bytes per selected sample, and the time of an untraced run; then, with the budget
growing with the queries, the time for 1k to 10k queries. Baseline in the same run: the bytes of
the search results themselves (12 bytes a candidate), which no coordinator can avoid holding.
Growth exponents are fitted over every size (log-log least squares), and the marginal bytes per
selected sample are the slope of a straight line through (selected, peak): what each further
sample costs once the fixed per-query costs are paid.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc

import numpy as np


def synthetic_results(nq: int, k: int, pool: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, I, query_class): each query's k neighbours from a window of 4k pool ids around its own centre."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, pool, nq)
    offsets = rng.integers(-2 * k, 2 * k, (nq, k))
    I = np.mod(centres[:, None] + offsets, pool).astype(np.int64)
    S = np.sort(rng.uniform(0.3, 0.95, (nq, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    query_class = (np.arange(nq) % 10).astype(np.int64)
    return S, I, query_class


def one_task(nq: int, budget: int, pool: int, workdir: str, *, trace: bool) -> dict:
    from sept.cluster.select_config import SelectConfig
    from sept.cluster.task_record import SelectionTask, task_records
    from sept.data import selection_folder as folder
    from sept.data.task_list import TaskSpec
    from sept.index.budget import neighbours_needed
    from sept.index.strategies import NeighbourBlock, choose, query_neighbours

    cfg = SelectConfig(index="-", encoder="-", target="-", budget=budget, out=workdir)
    k = neighbours_needed(budget, nq, pool)
    S, I, query_class = synthetic_results(nq, k, pool)
    names = [f"train/c{c}/{q}.png" for q, c in enumerate(query_class.tolist())]
    task = SelectionTask(
        spec=TaskSpec(name="t", target="/target", budget=budget),
        classes=[f"c{c}" for c in range(10)],
        query_refs=[f"/target/{n}" for n in names],
        query_names=names,
        query_class=query_class,
        heldout_refs=[],
    )
    settings = dict(
        target="/target",
        budget=budget,
        strategy=cfg.strategy,
        balance=cfg.balance,
        topk_share=cfg.topk_share,
        min_similarity=None,
        near_dup_threshold=None,
        leakage_guard=False,
        leakage_threshold=None,
        clusters=None,
        seed=None,
    )
    folder.claim_task(workdir, "t", settings, workdir)
    gc.collect()
    if trace:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    choice = choose(
        S, I, budget, strategy=cfg.strategy, balance=cfg.balance, query_class=query_class, topk_share=cfg.topk_share
    )
    neighbours = query_neighbours(choice, [NeighbourBlock.whole(S, I)], nq, 16)
    records = task_records(task, choice, neighbours, {}, settings=settings, extra=dict(k=k))
    folder.write_task_records(
        workdir, "t", queries=records.queries, leakage=records.leakage, summary=records.summary, choice=records.choice
    )
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    if trace:
        tracemalloc.stop()
    return dict(
        nq=nq, budget=budget, k=k, selected=len(choice), peak=peak, seconds=seconds, results=S.nbytes + I.nbytes
    )


def exponent(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10_000, help="target images of the budget sweep")
    ap.add_argument("--budgets", default="10000,30000,100000,300000,1000000")
    ap.add_argument("--query-sweep", default="1000,3000,10000", help="queries of the time sweep (budget 10 each)")
    ap.add_argument("--pool", type=int, default=100_000_000, help="pool ids drawn from")
    args = ap.parse_args()

    print("budget sweep (queries fixed):")
    print(
        f"{'budget':>9} {'k':>5} {'selected':>9} {'seconds':>8} {'peak MiB':>9} {'B/sample':>9} {'results B/sample':>17}"
    )
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        with tempfile.TemporaryDirectory(prefix="sept-bench-selmem-") as work:
            r = one_task(args.queries, budget, args.pool, work, trace=True)
        with tempfile.TemporaryDirectory(prefix="sept-bench-selmem-") as work:
            r["seconds"] = one_task(args.queries, budget, args.pool, work, trace=False)["seconds"]
        rows.append(r)
        print(
            f"{r['budget']:>9} {r['k']:>5} {r['selected']:>9} {r['seconds']:>8.2f} {r['peak'] / 2**20:>9.1f} "
            f"{r['peak'] / r['selected']:>9.0f} {r['results'] / r['selected']:>17.0f}"
        )
    budgets = [r["budget"] for r in rows]
    slope = float(np.polyfit([r["selected"] for r in rows], [r["peak"] for r in rows], 1)[0])
    print(
        f"peak memory exponent over budget {exponent(budgets, [r['peak'] for r in rows]):.2f}; "
        f"bytes per selected sample at the largest budget {rows[-1]['peak'] / rows[-1]['selected']:.0f} "
        f"({rows[-1]['peak'] / rows[-1]['results']:.2f}x the search results' own bytes); "
        f"marginal bytes per selected sample (slope of a linear fit of peak over selected) {slope:.0f}"
    )
    print("query sweep (budget 10 per query):")
    times = []
    sweep = [int(q) for q in args.query_sweep.split(",")]
    for nq in sweep:
        with tempfile.TemporaryDirectory(prefix="sept-bench-selmem-") as work:
            r = one_task(nq, 10 * nq, args.pool, work, trace=False)
        times.append(r["seconds"])
        print(f"  {nq:>6} queries, budget {10 * nq:>7}: {r['seconds']:.2f} s")
    print(f"time exponent over queries {exponent(sweep, times):.2f}")


if __name__ == "__main__":
    main()
