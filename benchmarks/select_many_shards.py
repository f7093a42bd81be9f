"""Benchmark: the search coordinator's overhead when a pool comes as many small index shards.

    .venv/bin/python benchmarks/select_many_shards.py --n 100000 --few 10 --many 1000

The same 100,000 synthetic 64-d vectors, with the same trained IVF-PQ, stored once as ``--few``
index shards and once as ``--many``; the same queries searched with ``search_index`` on a private
two-node Ray cluster (searchers loaded beforehand, so shard loading is not in the time). Both must
return identical results. Prints the wall time of each and the ratio many/few: what the
coordinator (and the searchers' per-shard work) adds per shard. The baseline is the few-shard run
of the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from select_common import build_index_store, synthetic_vectors, two_node_cluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--factory", default="IVF256,PQ16np")
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--few", type=int, default=10)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2, help="searches per store; the best time counts")
    args = ap.parse_args()

    import ray

    from sept.cluster.search import SearcherPool, search_index

    rng = np.random.default_rng(1)
    x = synthetic_vectors(args.n, args.d)
    xq = x[rng.choice(args.n, args.queries, replace=False)] + 0.05 * rng.normal(size=(args.queries, args.d)).astype(
        np.float32
    )
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="sept-bench-shards-") as work:
        stores = {
            n: build_index_store(os.path.join(work, f"index-{n}.zarr"), x, args.factory, n, nprobe=args.nprobe)
            for n in (args.few, args.many)
        }
        times, results = {}, {}
        with two_node_cluster() as address:
            ray.init(address=address, logging_level="ERROR")
            try:
                for n, store in stores.items():
                    with SearcherPool(store.path) as pool:
                        search_index(store.path, xq[:64], args.k, pool=pool, searchers=4)  # load the shards
                        best = np.inf
                        for _ in range(args.repeats):
                            t0 = time.perf_counter()
                            results[n] = search_index(store.path, xq, args.k, pool=pool, searchers=4)
                            best = min(best, time.perf_counter() - t0)
                        times[n] = best
            finally:
                ray.shutdown()
    (Df, If), (Dm, Im) = results[args.few], results[args.many]
    identical = bool(np.array_equal(If, Im) and np.allclose(Df, Dm))
    for n in (args.few, args.many):
        print(f"{n:>5} index shards: {times[n]:.2f} s for {args.queries} queries, k={args.k}")
    print(
        f"ratio {args.many} / {args.few} shards: {times[args.many] / times[args.few]:.2f}x; identical results: {identical}"
    )


if __name__ == "__main__":
    main()
