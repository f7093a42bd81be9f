"""Dedup speed: `sept dedup` on N synthetic clustered vectors with planted near copies, against bare
faiss range search over an IVF of the same lists, in the same run, at three or more sizes.

The vectors (128-d, Gaussian clusters around 1000 centres, L2-normalised; benchmarks/index_build.py)
are written shard by shard into an embeddings store with random content hashes; in each shard 1%
of the rows are replaced by near copies (noise 0.01, cosine ~0.995) of other rows of that shard.

- sept: `sept dedup` as a subprocess (local Ray, one task a CPU). Peak memory is the summed PSS
  (and RSS) of its whole process tree, sampled every 0.2 s.
- bare faiss: one process reads every vector (float32), trains an IndexIVFFlat with as many lists
  as sept's k-means has clusters on the same number of vectors, adds all, and range-searches every
  vector at the same threshold with nprobe=1 (a vector's own list: what sept compares within).

Printed: seconds, seconds per million vectors, peak memory, planted pairs found, the ratio sept /
bare at each size, and the growth exponent of each over the sizes (least squares in log-log).

    .venv/bin/python benchmarks/dedup_speed.py --sizes 300000 1000000 3000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from index_build import GIB, clustered, run_measured  # noqa: E402

from sept.cluster.dedup import default_train_size  # noqa: E402

BIN = os.path.dirname(sys.executable)
COPY_SHARE = 0.01


def make_store(path: str, n: int, dim: int, shard_rows: int) -> int:
    """The store (made once per parameters); returns the number of planted copies."""
    from sept.data.identity import make_ids
    from sept.index.embedding_store import EmbeddingStore, EncoderIdentity

    shards = -(-n // shard_rows)
    params = dict(n=n, dim=dim, shard_rows=shard_rows, copy_share=COPY_SHARE)
    marker = os.path.join(path, "synthetic.json")
    planted = 0
    store = None
    if os.path.exists(marker):
        with open(marker) as f:
            saved = json.load(f)
        if saved["params"] == params:
            return saved["planted"]
    subprocess.run(["rm", "-rf", path], check=True)
    pool = [f"/synthetic/{s:05d}.tar" for s in range(shards)]
    store = EmbeddingStore.create_or_open(path, encoder=EncoderIdentity("synthetic", "synthetic", dim, 0), pool=pool)
    for s in range(shards):
        rows = min(shard_rows, n - s * shard_rows)
        x = clustered(rows, dim, sample_seed=1 + s)
        rng = np.random.default_rng(10_000 + s)
        k = int(rows * COPY_SHARE)
        copies, sources = rows - k + np.arange(k), rng.choice(rows - k, k, replace=False)
        x[copies] = x[sources] + 0.01 * rng.standard_normal((k, dim), dtype=np.float32)
        x[copies] /= np.linalg.norm(x[copies], axis=1, keepdims=True)
        hashes = rng.integers(0, 2**63, size=(rows, 2)).astype(np.uint64)
        store.write_shard(s, x, make_ids(s, np.arange(rows)), hashes=hashes)
        planted += k
    with open(marker, "w") as f:
        json.dump(dict(params=params, planted=planted), f)
    return planted


BARE = r"""
import json, resource, sys, time
import faiss, numpy as np
from sept.index.embedding_store import EmbeddingStore
emb_path, nlist, train_size, threshold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
start = time.perf_counter()
emb = EmbeddingStore.open(emb_path)
n = emb.total_count()
x = np.empty((n, emb.dim), np.float32)
at = 0
for _, xs, _ in emb.iter_shards():
    x[at : at + len(xs)] = xs
    at += len(xs)
x /= np.linalg.norm(x, axis=1, keepdims=True)
index = faiss.IndexIVFFlat(faiss.IndexFlatIP(emb.dim), emb.dim, nlist, faiss.METRIC_INNER_PRODUCT)
index.train(x[np.random.default_rng(0).choice(n, train_size, replace=False)])
index.add(x)
index.nprobe = 1
pairs = 0
for a in range(0, n, 65536):
    lims, _, _ = index.range_search(x[a : a + 65536], threshold)
    pairs += int(lims[-1]) - min(65536, n - a)  # every vector finds itself
print(json.dumps(dict(seconds=time.perf_counter() - start, pairs=pairs,
                      max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def exponent(sizes: list[int], values: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300_000, 1_000_000, 3_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.96)
    parser.add_argument("--cluster-size", type=int, default=1024)
    parser.add_argument("--workdir", default="/tmp/sept-bench-dedup")
    args = parser.parse_args()
    if len(args.sizes) < 3:
        sys.exit("a growth exponent needs at least three --sizes")
    os.makedirs(args.workdir, exist_ok=True)
    header = (
        f"{'n':>9} {'sept s':>8} {'s/M':>7} {'PSS GiB':>8} {'found':>12} "
        f"{'bare s':>8} {'s/M':>7} {'RSS GiB':>8} {'sept/bare':>9}"
    )
    print(header, flush=True)
    rows = []
    for n in args.sizes:
        emb = os.path.join(args.workdir, f"emb-{n}-{args.dim}.zarr")
        planted = make_store(emb, n, args.dim, args.shard_rows)
        subprocess.run(["rm", "-rf", os.path.join(emb, "dedup"), os.path.join(emb, "dedup-work")], check=True)
        cmd = [
            os.path.join(BIN, "sept"),
            "dedup",
            "--embeddings",
            emb,
            "--threshold",
            str(args.threshold),
            "--cluster-size",
            str(args.cluster_size),
        ]
        proc, sept_s, pss, _ = run_measured(cmd, os.path.join(args.workdir, f"dedup-{n}.log"))
        if proc.returncode != 0:
            sys.exit(f"sept dedup failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout[proc.stdout.index("{") :])
        clusters = max(1, -(-n // args.cluster_size))
        bare, bare_s, _, _ = run_measured(
            [
                sys.executable,
                "-c",
                BARE,
                emb,
                str(clusters),
                str(min(n, default_train_size(clusters))),
                str(args.threshold),
            ],
            os.path.join(args.workdir, f"bare-{n}.log"),
        )
        if bare.returncode != 0:
            sys.exit(f"bare faiss failed:\n{bare.stderr[-3000:]}")
        b = json.loads(bare.stdout)
        row = dict(
            n=n,
            sept_s=sept_s,
            sept_pss=pss,
            removed=summary["removed"],
            planted=planted,
            bare_s=b["seconds"],
            bare_rss=b["max_rss"],
            bare_pairs=b["pairs"] // 2,
        )
        rows.append(row)
        print(
            f"{n:>9} {sept_s:>8.1f} {sept_s / n * 1e6:>7.1f} {pss / GIB:>8.2f} {summary['removed']:>6}/{planted:<5} "
            f"{b['seconds']:>8.1f} {b['seconds'] / n * 1e6:>7.1f} {b['max_rss'] / GIB:>8.2f} {sept_s / b['seconds']:>9.2f}",
            flush=True,
        )
    sizes = [r["n"] for r in rows]
    print(
        f"growth exponent of time: sept {exponent(sizes, [r['sept_s'] for r in rows]):.2f}, "
        f"bare faiss {exponent(sizes, [r['bare_s'] for r in rows]):.2f} (goal for sept: <= 1.2); "
        f"of peak memory: sept {exponent(sizes, [r['sept_pss'] for r in rows]):.2f}, "
        f"bare {exponent(sizes, [r['bare_rss'] for r in rows]):.2f}"
    )
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
