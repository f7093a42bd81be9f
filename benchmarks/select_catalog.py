"""Benchmark: reading a shared shard folder's catalog (every copy job's done-marker), as the select
driver does before it writes the manifests: held and peak memory per row, columns against the
plain dict a row that sept read before, in the same run.

    .venv/bin/python benchmarks/select_catalog.py 200000
"""

import json
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from sept.data.selection_folder import CATALOG, read_catalog, read_json

n, jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000, 20
d = tempfile.mkdtemp()
os.makedirs(os.path.join(d, CATALOG))
rng = np.random.default_rng(0)
for j in range(jobs):
    rows = [
        dict(
            id=int(i),
            key=f"{i:09d}",
            shard=f"part-{j:03d}-{i % 7:06d}.tar",
            source_shard=f"/pool/{i >> 32:05d}.tar",
            source_index=int(i >> 32),
            position=int(i & 0xFFFFFFFF),
            members=["jpg", "json", "txt"],
            sha256=f"{i:016x}",
        )
        for i in range(j * n // jobs, (j + 1) * n // jobs)
    ]
    json.dump(dict(job=str(j), rows=rows, parts={}), open(os.path.join(d, CATALOG, f"{j}.json"), "w"))


def old():
    rows = {}
    for name in sorted(os.listdir(os.path.join(d, CATALOG))):
        for row in read_json(os.path.join(d, CATALOG, name))["rows"]:
            rows[int(row["id"])] = row
    return rows


for name, fn in (("dict per row (before)", old), ("columns (now)", lambda: read_catalog(d))):
    tracemalloc.start()
    t = time.perf_counter()
    c = fn()
    s = time.perf_counter() - t
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{name:24s} held {cur / n:7.0f} B/row  peak {peak / n:7.0f} B/row  {s:.2f} s (traced)")
    del c
