"""`sept index` against autofaiss on the same 1M vectors and the same memory budget, in the same run.

autofaiss needs numpy < 2, so it runs in a venv of its own (--autofaiss-python), made once with

    python3.11 -m venv /tmp/afvenv && /tmp/afvenv/bin/pip install "numpy<2" "faiss-cpu<1.8" "pyarrow<16" autofaiss

Both build from the same synthetic clustered vectors (benchmarks/index_build.py's generator);
autofaiss reads them as one .npy file. Each side's build time is the wall time of its build
command (sept: `sept index`, then `sept index eval` to pick nprobe; autofaiss: `build_index`,
which tunes its own search parameters). Recall@10 is measured on 1000 held-out queries drawn
from the same distribution (not in the index) against exact search, at the nprobe (or search
parameters) each side picked.

    .venv/bin/python benchmarks/index_autofaiss.py --autofaiss-python /tmp/afvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from index_build import clustered, make_embeddings  # noqa: E402

BIN = os.path.dirname(sys.executable)

AUTOFAISS = r"""
import json, sys, time
import faiss, numpy as np
from autofaiss import build_index
emb_dir, index_path, infos_path, budget, queries, truth, k = sys.argv[1:8]
start = time.perf_counter()
index, infos = build_index(embeddings=emb_dir, index_path=index_path, index_infos_path=infos_path,
                           max_index_memory_usage=budget, current_memory_available="8G", metric_type="ip",
                           nb_cores=2, verbose=30)
seconds = time.perf_counter() - start
index = faiss.read_index(index_path)
with open(infos_path) as f:
    params = json.load(f).get("index_param", "")
if params:
    faiss.ParameterSpace().set_index_parameters(index, params)
xq, gt, k = np.load(queries), np.load(truth), int(k)
_, I = index.search(xq, k)
recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(I, gt[:, :k])]))
print(json.dumps(dict(seconds=seconds, recall=recall, factory=infos.get("index_key"), params=params)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autofaiss-python", required=True, help="python of a venv with autofaiss installed")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--memory-budget", default="256M")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/sept-bench-autofaiss")
    args = parser.parse_args()

    import faiss

    from sept.index.embedding_store import EmbeddingStore
    from sept.index.merge import merge_topk
    from sept.index.store import IndexStore

    os.makedirs(args.workdir, exist_ok=True)
    emb = os.path.join(args.workdir, f"emb-{args.n}.zarr")
    make_embeddings(emb, args.n, args.dim, shard_rows=250_000)
    store = EmbeddingStore.open(emb)
    npy_dir = os.path.join(args.workdir, "npy")
    xb = None
    if not os.path.exists(os.path.join(npy_dir, "emb.npy")):
        os.makedirs(npy_dir, exist_ok=True)
        xb, _ = store.read_all()
        np.save(os.path.join(npy_dir, "emb.npy"), xb)
    xb = np.load(os.path.join(npy_dir, "emb.npy"), mmap_mode="r") if xb is None else xb
    _, ids = store.read_all()
    # held-out queries: the same centres, a sample seed no shard uses, so none of them is in the index
    xq = clustered(args.queries, args.dim, sample_seed=10**6, centre_seed=0)
    _, gt_rows = faiss.knn(xq, np.ascontiguousarray(xb, dtype=np.float32), args.k, faiss.METRIC_INNER_PRODUCT)
    np.save(os.path.join(args.workdir, "queries.npy"), xq)
    np.save(os.path.join(args.workdir, "truth.npy"), gt_rows)

    # sept: build, then eval to pick nprobe
    index = os.path.join(args.workdir, "sept-index.zarr")
    subprocess.run(["rm", "-rf", index], check=True)
    start = time.perf_counter()
    subprocess.run(
        [
            os.path.join(BIN, "sept"),
            "index",
            "--embeddings",
            emb,
            "--out",
            index,
            "--memory-budget",
            args.memory_budget,
            "--shards",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    sept_build = time.perf_counter() - start
    subprocess.run(
        [os.path.join(BIN, "sept"), "index", "eval", "--index", index, "--embeddings", emb, "--queries", "300"],
        check=True,
        capture_output=True,
    )
    sept_total = time.perf_counter() - start
    istore = IndexStore.open(index)
    attrs = istore.attrs
    shards = [istore.load_shard(j) for j in range(istore.nshards)]
    _, I = merge_topk([s.search(xq, args.k) for s in shards], args.k, metric="ip")
    truth_ids = ids[gt_rows]
    sept_recall = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(I, truth_ids)]))

    af = subprocess.run(
        [
            args.autofaiss_python,
            "-c",
            AUTOFAISS,
            npy_dir,
            os.path.join(args.workdir, "af.index"),
            os.path.join(args.workdir, "af.json"),
            args.memory_budget.replace("M", "MB").replace("G", "GB"),
            os.path.join(args.workdir, "queries.npy"),
            os.path.join(args.workdir, "truth.npy"),
            str(args.k),
        ],
        capture_output=True,
        text=True,
    )
    if af.returncode != 0:
        sys.exit(f"autofaiss failed:\n{af.stderr[-3000:]}")
    autofaiss = json.loads(af.stdout.strip().splitlines()[-1])

    print(f"{args.n} x {args.dim} vectors, --memory-budget {args.memory_budget}, {len(xq)} held-out queries")
    print(f"{'':<10} {'factory':<34} {'search params':<22} {'build s':>8} {'recall@' + str(args.k):>10}")
    print(
        f"{'sept':<10} {attrs['spec']['factory']:<34} {'nprobe=' + str(attrs['nprobe']):<22} "
        f"{sept_total:>8.1f} {sept_recall:>10.3f}   (build {sept_build:.1f} s + eval {sept_total - sept_build:.1f} s)"
    )
    print(
        f"{'autofaiss':<10} {autofaiss['factory']:<34} {autofaiss['params'][:22]:<22} "
        f"{autofaiss['seconds']:>8.1f} {autofaiss['recall']:>10.3f}"
    )
    print(
        f"\nratio sept / autofaiss: build time {sept_total / autofaiss['seconds']:.2f} "
        f"(build alone {sept_build / autofaiss['seconds']:.2f}), recall@{args.k} {sept_recall / autofaiss['recall']:.2f}"
    )


if __name__ == "__main__":
    main()
