"""Benchmark: sharded search on two Ray nodes vs one monolithic index in one process, and end-to-end choosing.

    .venv/bin/python benchmarks/select_search.py --n 1000000 --queries 10000

Builds a synthetic index store (IVF-PQ, 4 shards) over n unit vectors, then:
1. searches the queries with one monolithic faiss index over the same codes, in this process,
   with every core (the baseline), and with 4 searcher actors on a private two-node Ray cluster,
   checks that both give identical ids and distances, and prints the QPS ratio;
2. times the vector part of `sept select` end to end for those queries: starting the searchers,
   loading the shards, searching, merging, SEPT's per-instance fill with dedup, and the leakage
   search for held-out images (materialization is benchmarked by select_materialize.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from select_common import build_index_store, monolithic_index, synthetic_vectors, two_node_cluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--factory", default="IVF1024,PQ16np")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--budget", type=int, default=100_000, help="budget of the end-to-end choice")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out images for the leakage search")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import ray

    from sept.cluster.search import TIE_MARGIN, SearcherPool, SearchStats, search_index
    from sept.index.budget import neighbours_needed
    from sept.index.dedup import leaked_ids, to_similarity
    from sept.index.merge import canonical_order
    from sept.index.strategies import choose

    work = args.workdir or tempfile.mkdtemp(prefix="sept-bench-search-")
    rng = np.random.default_rng(1)
    t0 = time.time()
    x = synthetic_vectors(args.n, args.d)
    xq = x[rng.choice(args.n, args.queries, replace=False)] + 0.05 * rng.normal(size=(args.queries, args.d)).astype(
        np.float32
    )
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xh = x[rng.choice(args.n, args.heldout, replace=False)]
    store = build_index_store(os.path.join(work, "index.zarr"), x, args.factory, args.shards, nprobe=args.nprobe)
    del x
    build_s = time.time() - t0

    # Baseline: one process, one index over all codes, every core.
    faiss.omp_set_num_threads(os.cpu_count())
    mono = monolithic_index(store)
    mono.search(xq[:256], args.k)  # warm up
    t0 = time.time()
    D_mono, I_mono = mono.search(xq, args.k)
    mono_s = time.time() - t0
    # The reference: the same top-k with ties at the k-th place broken by id, as the merge does.
    D_ref, I_ref = canonical_order(*mono.search(xq, args.k + TIE_MARGIN), metric="ip")
    D_mono, I_mono = D_ref[:, : args.k], I_ref[:, : args.k]
    del mono

    with two_node_cluster() as address:
        ray.init(address=address, logging_level="ERROR")
        try:
            stats = SearchStats()
            with SearcherPool(store.path) as pool:
                t0 = time.time()
                search_index(store.path, xq[:256], args.k, pool=pool, stats=stats)  # start searchers, load shards
                load_s = time.time() - t0
                t0 = time.time()
                D, I = search_index(store.path, xq, args.k, pool=pool, stats=stats)
                sharded_s = time.time() - t0
            nodes = len(stats.nodes)
            identical = bool(np.array_equal(I, I_mono) and np.array_equal(D, D_mono))

            # End to end: fresh searchers, one search for queries + held-out images, merge, fill, leakage.
            t0 = time.time()
            k = neighbours_needed(args.budget, args.queries, args.n)
            De, Ie = search_index(store.path, np.concatenate([xq, xh]), max(k, 32))
            S = to_similarity(De, Ie, "ip")
            leaked, _ = leaked_ids(S[args.queries :, :32], Ie[args.queries :, :32], 0.97)
            choice = choose(S[: args.queries, :k], Ie[: args.queries, :k], args.budget, excluded=set(leaked))
            e2e_s = time.time() - t0
        finally:
            ray.shutdown()

    qps_mono, qps_sharded = args.queries / mono_s, args.queries / sharded_s
    result = dict(
        n=args.n,
        d=args.d,
        queries=args.queries,
        factory=args.factory,
        nprobe=args.nprobe,
        k=args.k,
        shards=args.shards,
        ray_nodes=nodes,
        cpus=os.cpu_count(),
        build_seconds=round(build_s, 1),
        monolithic_qps=round(qps_mono, 1),
        sharded_qps=round(qps_sharded, 1),
        qps_ratio_sharded_vs_monolithic=round(qps_sharded / qps_mono, 3),
        identical_results=identical,
        searcher_start_and_load_seconds=round(load_s, 2),
        end_to_end=dict(
            seconds=round(e2e_s, 2),
            budget=args.budget,
            k=k,
            heldout=args.heldout,
            selected=len(choice),
            leaked=len(leaked),
        ),
    )
    print(json.dumps(result, indent=2))
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
