"""Index build on N synthetic clustered 128-d float16 vectors: peak memory and wall time of
`sept index`, against a naive single-process faiss build of the same factory, in the same run.

The vectors (Gaussian clusters around 1000 centres, L2-normalised) are written into an
embeddings store shard by shard, so generating them never holds them all. Then:

- sept: `sept index --memory-budget B --shards S` as a subprocess (local Ray, one encoding task a
  CPU); its peak memory is the peak of the summed PSS (and, more pessimistic, RSS) of its whole
  process tree (driver, Ray daemons, workers), sampled every 0.2 s from /proc.
- naive: one process reads every vector into memory, trains the same factory on the same
  sample size with the same seed, and adds everything to one faiss index; peak = its max RSS.

    .venv/bin/python benchmarks/index_build.py --n 10000000 --memory-budget 1G --shards 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

GIB = 1024**3
BIN = os.path.dirname(sys.executable)


def clustered(rows: int, dim: int, *, sample_seed: int, centre_seed: int = 0) -> np.ndarray:
    """rows L2-normalised vectors around 1000 Gaussian centres (fixed by centre_seed), noise 0.6."""
    centres = np.random.default_rng(centre_seed).normal(size=(1000, dim)).astype(np.float32)
    rng = np.random.default_rng(sample_seed)
    x = centres[rng.integers(len(centres), size=rows)]
    x += 0.6 * rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_embeddings(path: str, n: int, dim: int, shard_rows: int, seed: int = 0) -> None:
    from sept.data.identity import make_ids
    from sept.index.embedding_store import EmbeddingStore, EncoderIdentity

    shards = -(-n // shard_rows)
    pool = [f"/synthetic/{s:05d}.tar" for s in range(shards)]
    marker = os.path.join(path, "synthetic.json")
    params = dict(n=n, dim=dim, shard_rows=shard_rows, seed=seed)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return
    store = EmbeddingStore.create_or_open(path, encoder=EncoderIdentity("synthetic", "synthetic", dim, 0), pool=pool)
    for s in range(shards):
        if store.is_complete(s):
            continue
        rows = min(shard_rows, n - s * shard_rows)
        store.write_shard(
            s, clustered(rows, dim, sample_seed=seed + 1 + s, centre_seed=seed), make_ids(s, np.arange(rows))
        )
    with open(marker, "w") as f:
        json.dump(params, f)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    """(summed PSS, summed RSS) in bytes of the given processes."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


def run_measured(cmd: list[str], log_path: str) -> tuple[subprocess.CompletedProcess, float, int, int]:
    """Run cmd, sampling the memory of its process tree; (process, seconds, peak PSS, peak RSS).

    Its stderr goes to log_path as it runs (progress bars included), its stdout is returned."""
    start = time.perf_counter()
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pss, rss = _memory(_tree(proc.pid))
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    log.close()
    with open(log_path) as f:
        err = f.read()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seconds, peak[0], peak[1]


NAIVE = r"""
import json, resource, sys, time
import faiss, numpy as np
from sept.index.embedding_store import EmbeddingStore
from sept.index.codes import train_index
emb_path, factory, train_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
emb = EmbeddingStore.open(emb_path)
n = emb.total_count()
x, ids = np.empty((n, emb.dim), np.float32), np.empty(n, np.int64)  # the whole pool in memory, as float32
at = 0
for _, xs, idss in emb.iter_shards():
    x[at : at + len(xs)], ids[at : at + len(xs)] = xs, idss
    at += len(xs)
index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
train_index(index, emb.sample(train_size, seed=0), seed=0)
index.add_with_ids(x, ids)
print(json.dumps(dict(seconds=time.perf_counter() - start, ntotal=int(index.ntotal),
                      max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def _row(name: str, seconds: float, pss: int, rss: int) -> str:
    return f"{name:<34} {seconds:>8.1f} {pss / GIB:>13.2f} {rss / GIB:>13.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shard-rows", type=int, default=250_000, help="vectors per embeddings shard")
    parser.add_argument("--memory-budget", default="1G")
    parser.add_argument("--shards", type=int, default=8, help="index shards")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/sept-bench-index")
    parser.add_argument("--skip-naive", action="store_true", help="only the sept build")
    parser.add_argument("--eval-queries", type=int, default=0, help="then run `sept index eval` with this many")
    args = parser.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    emb = os.path.join(args.workdir, f"emb-{args.n}-{args.dim}.zarr")
    t = time.perf_counter()
    make_embeddings(emb, args.n, args.dim, args.shard_rows)
    print(f"embeddings: {args.n} x {args.dim} float16 in {emb} ({time.perf_counter() - t:.0f} s to make or find)")

    index = os.path.join(args.workdir, f"index-{args.n}.zarr")
    subprocess.run(["rm", "-rf", index], check=True)
    cmd = [
        os.path.join(BIN, "sept"),
        "index",
        "--embeddings",
        emb,
        "--out",
        index,
        "--memory-budget",
        args.memory_budget,
        "--shards",
        str(args.shards),
        "--train-size",
        str(args.train_size),
    ]
    proc, sept_s, sept_pss, sept_rss = run_measured(cmd, os.path.join(args.workdir, "sept-index.log"))
    if proc.returncode != 0:
        sys.exit(f"sept index failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    print(f"sept index: {summary['factory']} ({summary['reason']})")
    header = f"{'build':<34} {'wall s':>8} {'peak PSS GiB':>13} {'peak RSS GiB':>13}"
    rows = [("sept index (Ray tasks, batched)", sept_s, sept_pss, sept_rss)]
    print(f"{header}\n{_row(*rows[0])}", flush=True)
    if not args.skip_naive:
        naive, naive_s, naive_pss, naive_rss = run_measured(
            [sys.executable, "-c", NAIVE, emb, summary["factory"], str(args.train_size)],
            os.path.join(args.workdir, "naive.log"),
        )
        if naive.returncode != 0:
            sys.exit(f"naive build failed:\n{naive.stderr[-3000:]}")
        result = json.loads(naive.stdout.strip().splitlines()[-1])
        rows.append(("naive (all in memory, 1 process)", naive_s, naive_pss, max(naive_rss, result["max_rss"])))
    print(f"\n{header}")
    for row in rows:
        print(_row(*row))
    if len(rows) == 2:
        print(
            f"\nratio sept / naive: wall {rows[0][1] / rows[1][1]:.2f}, peak PSS {rows[0][2] / rows[1][2]:.2f}, "
            f"peak RSS {rows[0][3] / rows[1][3]:.2f}"
        )
    print(f"sept peak memory {'within' if sept_rss <= 6 * GIB else 'OVER'} 6 GiB (RSS {sept_rss / GIB:.2f} GiB)")
    if args.eval_queries:
        ev = subprocess.run(
            [
                os.path.join(BIN, "sept"),
                "index",
                "eval",
                "--index",
                index,
                "--embeddings",
                emb,
                "--queries",
                str(args.eval_queries),
            ],
            capture_output=True,
            text=True,
        )
        print(ev.stdout or ev.stderr[-2000:])


if __name__ == "__main__":
    main()
