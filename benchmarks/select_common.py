"""Shared by the selection benchmarks: a private two-node Ray cluster and synthetic index stores.

The cluster runs on this machine (two raylets on loopback, like the tests'), on its own ports and
temp folder, and is stopped by killing only its own processes, so other clusters on the machine
are left alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import faiss
import numpy as np

from sept.index.codes import encode_shard, train_index
from sept.index.spec import METRICS
from sept.index.store import IndexStore

# Ray reads its auth settings once, at first use: they are set before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
NODE_IP = "127.0.0.2"


@contextmanager
def two_node_cluster(cpus_per_node: int = 2, port: int = 6395):
    """Yields the address of a fresh two-node Ray cluster; the environment carries its auth token."""
    temp_dir = tempfile.mkdtemp(prefix="sept-bench-ray-", dir="/tmp")
    common = [f"--num-cpus={cpus_per_node}", "--disable-usage-stats", f"--node-ip-address={NODE_IP}"]
    head = [
        RAY,
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        f"--ray-client-server-port={port + 1}",
        f"--dashboard-agent-listen-port={port + 2}",
        f"--metrics-export-port={port + 3}",
        "--min-worker-port=24000",
        "--max-worker-port=24999",
        *common,
    ]
    worker = [
        RAY,
        "start",
        f"--address={NODE_IP}:{port}",
        f"--dashboard-agent-listen-port={port + 4}",
        f"--metrics-export-port={port + 5}",
        "--min-worker-port=25000",
        "--max-worker-port=25999",
        *common,
    ]
    try:
        subprocess.run(head, check=True, capture_output=True, timeout=180)
        subprocess.run(worker, check=True, capture_output=True, timeout=180)
        time.sleep(2)
        yield f"{NODE_IP}:{port}"
    finally:
        pids = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def synthetic_vectors(n: int, d: int, seed: int = 0, clusters: int = 256) -> np.ndarray:
    """Unit vectors around `clusters` centres: an embedding-like distribution, not uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        x[a:b] = centres[rng.integers(0, clusters, b - a)] + 0.6 * rng.normal(size=(b - a, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def build_index_store(
    path: str,
    x: np.ndarray,
    factory: str,
    nshards: int,
    *,
    metric: str = "ip",
    nprobe: int = 16,
    train_size: int = 50_000,
    seed: int = 0,
) -> IndexStore:
    """An index store as `sept index` writes it, over `x` with ids 0..n-1, in `nshards` contiguous shards."""
    trained = train_index(
        faiss.index_factory(x.shape[1], factory, METRICS[metric]),
        x[np.random.default_rng(seed).choice(len(x), min(len(x), train_size), replace=False)],
        seed=seed,
    )
    bounds = np.linspace(0, len(x), nshards + 1).astype(int)
    store = IndexStore.create(
        path,
        trained=trained,
        attrs=dict(
            metric=metric,
            dim=x.shape[1],
            nprobe=nprobe,
            ntotal=len(x),
            assignment=[[j] for j in range(nshards)],
            spec=dict(factory=factory, metric=metric, shards=nshards),
        ),
    )
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        store.write_shard(j, *encode_shard(trained, x[a:b], np.arange(a, b, dtype=np.int64)))
    store.update_attrs(complete=True)
    return store


def monolithic_index(store: IndexStore) -> faiss.Index:
    """One faiss index over every shard's stored codes (the reference a sharded search must equal)."""
    from sept.index.codes import index_from_codes

    parts = [store.read_shard(j) for j in range(store.nshards)]
    nlist = len(parts[0][0]) - 1
    ids, codes, sizes = [], [], []
    for lst in range(nlist):
        for offsets, pid, pcodes in parts:
            ids.append(pid[offsets[lst] : offsets[lst + 1]])
            codes.append(pcodes[offsets[lst] : offsets[lst + 1]])
        sizes.append(sum(int(p[0][lst + 1] - p[0][lst]) for p in parts))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    index = index_from_codes(store.trained_index(), offsets, np.concatenate(ids), np.concatenate(codes))
    if faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(store.attrs["nprobe"]))
    return index
