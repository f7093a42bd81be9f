"""sept select: the retrieval coordinator, from target images to selected WebDataset shards.

It embeds the target's train images, has searcher actors query every index shard, merges the
per-shard top-k exactly, fills the budget SEPT's way (per instance, round robin, deduplicated),
materializes the selection byte for byte and writes the task's manifest.

Output directory::

    OUT/selection.json            the resolved config and the summary (a rerun must match it)
    OUT/shards/selected-*.tar     the selected samples, shared by every task selected into OUT
    OUT/tasks/TASK/manifest.jsonl one row per selected sample: key, id, source shard, position,
                                  output shard, score, and the target images that retrieved it
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np

from sept.cluster.materialize import materialize
from sept.cluster.runtime import ray_session
from sept.cluster.search import search_index
from sept.data.identity import split_ids
from sept.errors import SeptError
from sept.index.budget import fill_budget, neighbours_needed
from sept.index.store import IndexStore

log = logging.getLogger(__name__)


@dataclass
class SelectConfig:
    index: str
    encoder: str
    target: str
    budget: int
    out: str
    task: str = ""
    ray_address: str | None = None
    searchers: int | None = None


def check_encoder_matches(index_attrs: dict, encoder, index_path: str, encoder_path: str) -> None:
    if int(encoder.dim) != int(index_attrs["dim"]):
        raise SeptError(
            f"encoder {encoder_path} gives {encoder.dim}-d vectors but index {index_path} holds {index_attrs['dim']}-d vectors"
        )
    if encoder.identity != index_attrs["encoder"]["identity"]:
        raise SeptError(
            f"encoder {encoder_path} ({encoder.identity}) is not the encoder index {index_path} was built with "
            f"({index_attrs['encoder']['identity']})"
        )


def select(cfg: SelectConfig) -> dict:
    from sept.data.targets import load_target
    from sept.training.encoder import load_encoder

    store = IndexStore.open(cfg.index)
    attrs = store.attrs
    if not attrs.get("complete"):
        raise SeptError(f"index {cfg.index} is incomplete; rerun `sept index`")
    ntotal = int(attrs["ntotal"])
    if cfg.budget <= 0:
        raise SeptError(f"--budget must be positive, got {cfg.budget}")
    if cfg.budget > ntotal:
        raise SeptError(f"--budget {cfg.budget} is larger than the pool's {ntotal} indexed samples")
    encoder = load_encoder(cfg.encoder)
    check_encoder_matches(attrs, encoder, cfg.index, cfg.encoder)
    task = load_target(cfg.target, name=cfg.task or None)
    name = cfg.task or task.name
    resolved = dict(asdict(cfg), task=name, index=store.path, encoder_identity=encoder.identity,
                    target=os.path.abspath(cfg.target))
    resolved.pop("ray_address")
    resolved.pop("searchers")
    _claim_output(cfg.out, resolved)

    images = task.load_images("train")
    xq = encoder.embed_images(images)
    log.info("select: %d target images of task %s, budget %d of %d", len(xq), name, cfg.budget, ntotal)
    k = neighbours_needed(cfg.budget, len(xq), ntotal)
    with ray_session(cfg.ray_address):
        while True:
            D, I = search_index(store.path, xq, k, searchers=cfg.searchers)
            selection = fill_budget(D, I, cfg.budget, metric=attrs["metric"])
            if len(selection) >= cfg.budget or k >= ntotal:
                break
            k = min(ntotal, 2 * k)  # the targets' neighbourhoods overlap a lot: look further
        rows = materialize(selection.ids, attrs["pool"], os.path.join(cfg.out, "shards"))

    by_key = {(r["source_index"], r["position"]): r for r in rows}
    shard_idx, positions = split_ids(selection.ids)
    target_names = [os.path.relpath(p, os.path.abspath(cfg.target)) for p, _ in task.train]
    manifest = []
    for j, pid in enumerate(selection.ids.tolist()):
        row = by_key[(int(shard_idx[j]), int(positions[j]))]
        manifest.append(dict(id=pid, key=row["key"], shard=row["shard"], source_shard=row["source_shard"],
                             position=row["position"], sha256=row["sha256"], score=float(selection.scores[j]),
                             retrieved_by=[target_names[q] for q in selection.retrieved_by[j]]))
    task_dir = os.path.join(cfg.out, "tasks", name)
    os.makedirs(task_dir, exist_ok=True)
    _write_atomic(os.path.join(task_dir, "manifest.jsonl"), "".join(json.dumps(m) + "\n" for m in manifest))
    summary = dict(task=name, selected=len(manifest), budget=cfg.budget, queries=len(xq), k=k,
                   shards=sorted({r["shard"] for r in rows}), out=os.path.abspath(cfg.out))
    _write_atomic(os.path.join(cfg.out, "selection.json"), json.dumps(dict(config=resolved, summary=summary), indent=2))
    return summary


def _claim_output(out: str, resolved: dict) -> None:
    """Refuse to mix two different runs in one output directory; the same run resumes."""
    record = os.path.join(out, "selection.json")
    if os.path.exists(record):
        with open(record) as f:
            old = json.load(f)["config"]
        if old != resolved:
            changed = sorted(k for k in resolved if old.get(k) != resolved[k])
            raise SeptError(f"{out} already holds a different selection (differs in {', '.join(changed)}); "
                            "choose another --out or delete it")
        return
    if os.path.exists(out) and os.listdir(out):
        raise SeptError(f"{out} exists and does not hold a sept selection; choose another --out")
    os.makedirs(out, exist_ok=True)
    _write_atomic(record, json.dumps(dict(config=resolved, summary=None), indent=2))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
