"""Materialization: copy the selected samples, byte for byte, into WebDataset shards, in parallel.

One Ray task per source shard reads that shard once and writes its selected samples to its
own output shard (``selected-SSSSS-*.tar``), so tasks never share a file and each output shard
appears atomically. A rerun finds finished output shards and reads their rows back instead of
copying again.
"""

from __future__ import annotations

import hashlib
import logging
import os

import ray
from tqdm import tqdm

from sept.data.identity import split_ids

log = logging.getLogger(__name__)


def _prefix(source_index: int) -> str:
    return f"selected-{source_index:05d}"


@ray.remote(num_cpus=1)
def materialize_source_shard(source_path: str, source_index: int, positions: list[int], out_dir: str) -> list[dict]:
    from sept.data.samples import iter_samples
    from sept.data.selection_writer import SelectionShardWriter, extract_samples

    done_marker = os.path.join(out_dir, f".{_prefix(source_index)}.done")
    rows = []
    if os.path.exists(done_marker):
        # Output shards keep source order, so the k-th sample read back sits at the k-th position.
        source_positions = iter(sorted(positions))
        for name in sorted(os.listdir(out_dir)):
            if name.startswith(_prefix(source_index) + "-") and name.endswith(".tar"):
                for sample in iter_samples(os.path.join(out_dir, name)):
                    rows.append(_row(sample, name, source_path, source_index, next(source_positions)))
    else:
        wanted = set(positions)
        with SelectionShardWriter(out_dir, prefix=_prefix(source_index), maxcount=10_000) as writer:
            for sample in extract_samples(source_path, wanted):
                shard = os.path.basename(writer.write(sample))
                rows.append(_row(sample, shard, source_path, source_index, sample.position))
        with open(done_marker, "w") as f:
            f.write("ok\n")
    return rows


def _row(sample, shard: str, source_path: str, source_index: int, position: int) -> dict:
    digest = hashlib.sha256()
    for ext in sorted(sample.members):
        digest.update(ext.encode())
        digest.update(sample.members[ext])
    return dict(key=sample.key, shard=shard, source_shard=source_path, source_index=source_index,
                position=position, members=sorted(sample.members), sha256=digest.hexdigest()[:16])


def materialize(ids, pool: list[str], out_dir: str) -> list[dict]:
    """Copy the samples with these global ids from the pool shards to out_dir. Needs a Ray session."""
    os.makedirs(out_dir, exist_ok=True)
    shard_idx, positions = split_ids(ids)
    by_shard: dict[int, list[int]] = {}
    for s, p in zip(shard_idx.tolist(), positions.tolist()):
        by_shard.setdefault(s, []).append(p)
    refs = [materialize_source_shard.remote(pool[s], s, sorted(ps), out_dir) for s, ps in sorted(by_shard.items())]
    rows: list[dict] = []
    with tqdm(total=len(refs), desc="materialize", unit="shard") as bar:
        pending = refs
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rows.extend(ray.get(done[0]))
            bar.update(1)
    return rows
