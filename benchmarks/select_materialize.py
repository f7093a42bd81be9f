"""Benchmark: materialization MB/s on two Ray nodes vs a plain sequential read of the same source shards.

    .venv/bin/python benchmarks/select_materialize.py --shards 16 --samples 1000 --fraction 0.5

Writes a synthetic img2dataset-style pool (jpg + json + txt per sample), selects a fraction of its
samples spread over every shard, and times:
1. the baseline: reading every source shard's bytes sequentially in this process (1 MiB reads),
   and, for context, reading them as samples with tarfile (`iter_samples`) in this process;
2. `sept.cluster.materialize.materialize` on a private two-node Ray cluster: each source shard read
   once, the selected samples copied byte for byte into verified, atomically renamed parts, each
   part hashed for the manifest.
Both rates are source-shard bytes per second, with the page cache warm for both, or with --cold
emptied of the source shards before each timed read (disk-bound, as on a cluster's shared storage).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from select_common import two_node_cluster  # noqa: E402


def write_pool(folder: str, shards: int, samples: int, seed: int = 0) -> list[str]:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = []
    for size in (80, 96, 112, 128):  # real JPEGs of 17-45 KB (img2dataset's 256 px photos are ~20-40 KB), reused
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    paths = []
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(path, encoder=False) as sink:
            for i in range(samples):
                key = f"{s:05d}{i:04d}"
                sink.write(
                    {
                        "__key__": key,
                        "jpg": jpegs[(s + i) % len(jpegs)],
                        "json": json.dumps({"key": key, "url": f"bench://{key}", "status": "success"}).encode(),
                        "txt": f"a sample image {key}".encode(),
                    }
                )
        paths.append(path)
    return paths


def evict(paths: list[str]) -> None:
    """Drop these files' pages from the page cache (only theirs), so the next read comes from disk."""
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def sequential_read(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                total += len(block)
    return total


def tarfile_read(paths: list[str]) -> int:
    """Reading the shards as samples with tarfile (`iter_samples`): what any sample reader pays."""
    from sept.data.samples import iter_samples

    return sum(1 for path in paths for _ in iter_samples(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--samples", type=int, default=1000, help="samples per source shard")
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of the pool selected")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="evict the source shards from the page cache before each timed read (disk-bound rates)",
    )
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    prepare = (lambda: evict(pool)) if args.cold else (lambda: sequential_read(pool))

    import ray

    from sept.cluster.materialize import materialize
    from sept.data.identity import make_ids

    work = args.workdir or tempfile.mkdtemp(prefix="sept-bench-materialize-")
    pool = write_pool(os.path.join(work, "pool"), args.shards, args.samples)
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [
            make_ids(s, np.sort(rng.choice(args.samples, int(args.samples * args.fraction), replace=False)))
            for s in range(args.shards)
        ]
    )
    prepare()  # warm (or, with --cold, empty) the page cache before every measurement
    t0 = time.time()
    nbytes = sequential_read(pool)
    read_s = time.time() - t0
    prepare()
    t0 = time.time()
    tarfile_read(pool)
    tar_s = time.time() - t0
    # The copy itself, in this process on one core, with no Ray around it (into a scratch folder).
    from sept.data.shard_copy import _copy_raw, plan_jobs

    scratch = os.path.join(work, "scratch")
    prepare()
    t0 = time.time()
    for job in plan_jobs(ids):
        _copy_raw(job, {s: pool[s] for s, _ in job.sources}, scratch, 10_000)
        shutil.rmtree(scratch)
    one_core_s = time.time() - t0
    out = os.path.join(work, "shards")
    with two_node_cluster() as address:
        ray.init(address=address, logging_level="ERROR")
        try:
            ray.get([ray.remote(lambda: 0).remote() for _ in range(8)])  # workers up before timing
            prepare()
            t0 = time.time()
            catalog = materialize(ids, pool, out)
            mat_s = time.time() - t0
        finally:
            ray.shutdown()
    written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".tar"))
    assert catalog.has(ids).all()
    read_mbs, mat_mbs = nbytes / read_s / 1e6, nbytes / mat_s / 1e6
    print(
        json.dumps(
            dict(
                page_cache="cold (evicted before each read)" if args.cold else "warm",
                source_shards=args.shards,
                samples_per_shard=args.samples,
                selected=len(ids),
                source_mb=round(nbytes / 1e6, 1),
                written_mb=round(written / 1e6, 1),
                cpus=os.cpu_count(),
                ray_nodes=2,
                sequential_read_mb_per_s=round(read_mbs, 1),
                materialize_mb_per_s=round(mat_mbs, 1),
                ratio_materialize_vs_read=round(mat_mbs / read_mbs, 3),
                materialize_seconds=round(mat_s, 2),
                copy_one_core_no_ray_mb_per_s=round(nbytes / one_core_s / 1e6, 1),
                tarfile_sample_read_mb_per_s=round(nbytes / tar_s / 1e6, 1),
                ratio_materialize_vs_tarfile_read=round(mat_mbs / (nbytes / tar_s / 1e6), 3),
            ),
            indent=2,
        )
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
