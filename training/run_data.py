"""The training data of one rank's run: the shards named by ``cfg.data`` (a shard spec, or one
task's subset of a selection's shared shards), with DetCon's segmentation masks added where the
method needs them and the shards have none, opened as this rank's ``PretrainStream``, and the
``PoolIds`` that name its samples as the pool does.

Masked copies are made once, each rank segmenting its share of the shards (``sept.data.masks``).
For a task of a selection on disk they go beside the selection (``SEL/masks/``, one copy of each
shared shard), so every later run, of any task and any number of ranks, reuses them; otherwise
they go to ``masked-shards/`` in the run directory. Either folder must be on a file system every
node shares. Shard sizes are counted once, by rank 0, and shared.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sept import storage
from sept.data.identity import split_ids
from sept.data.selection_folder import MASKS_DIR as SELECTION_MASKS_DIR
from sept.data.shards import list_shards
from sept.data.task_samples import TaskSamples
from sept.data.task_subset import is_task_data, open_task_data
from sept.errors import SeptError
from sept.training import distributed
from sept.training.acceleration import AccelerationPlan
from sept.training.augment import ViewAugment
from sept.training.config import PretrainConfig
from sept.training.loader import PretrainStream
from sept.training.methods import needs_masks
from sept.training.shard_assignment import count_shard_samples

log = logging.getLogger(__name__)

MASKED_SHARDS_DIRNAME = "masked-shards"
_MASKS_PER_PROCESS_START = 1000
"""Below this many images a rank segments them in its own process (a process pool starts in seconds)."""


@dataclass(frozen=True)
class PoolIds:
    """Turns the trainer's sample ids (``make_ids`` of its shard list's index and the position
    there) into pool ids, so a training log joins the selection's manifest and the embeddings.

    Trained on a pool spec, the trainer's shard list is the pool's listing and its ids are pool
    ids already (``samples`` None). Trained on a task subset, its shards are the selection's
    shared shards, and the pool id is found by (shard index, sample key) in the task's sorted
    arrays (``TaskSamples.pool_ids``): keys are unique within a shared shard and survive
    DetCon's masked copies, positions need not.
    """

    samples: TaskSamples | None = None

    def of(self, ids: np.ndarray | Sequence[int], keys: Sequence[str]) -> list[int]:
        if self.samples is None:
            return [int(i) for i in ids]
        shard_index, _ = split_ids(np.asarray(ids, dtype=np.int64))
        return self.samples.pool_ids(shard_index, keys).tolist()


def shard_counts(cfg: PretrainConfig, shards: list[str], is_main: bool) -> list[int]:
    """Samples per shard, counted by rank 0 and shared (or ``num_samples`` of a single shard)."""
    if cfg.num_samples is not None and len(shards) == 1:
        return [cfg.num_samples]
    # One rank counts, so a pool is not read world_size times over before training starts.
    counts = [count_shard_samples(s) for s in shards] if is_main else None
    return distributed.broadcast_object(counts)


def prepare_masks(
    cfg: PretrainConfig,
    shards: list[str],
    run_dir: str,
    info: distributed.DistInfo,
    selection_dir: str | None = None,
) -> list[str]:
    """The shards with segmentation masks: ``shards`` if they carry them, else masked copies
    (beside the selection ``selection_dir`` when it is on disk, else in the run directory),
    computed by every rank for its share of the shards not masked yet, then shared."""
    from sept.data.masks import add_masks, has_masks

    if has_masks(shards):
        return shards
    beside_selection = selection_dir is not None and not storage.is_url(selection_dir)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, cores // max(1, distributed.get_local_world_size()))
    mine = sum(count_shard_samples(s) for s in shards[info.rank :: info.world_size])
    if mine < _MASKS_PER_PROCESS_START:
        workers = 0  # starting processes would cost more than segmenting these few images here
    out_dir = (
        os.path.join(selection_dir, SELECTION_MASKS_DIR)
        if beside_selection
        else os.path.join(run_dir, MASKED_SHARDS_DIRNAME)
    )
    log.info("rank %d: Felzenszwalb masks for its share of %d shards in %s", info.rank, len(shards), out_dir)
    masked = add_masks(
        shards, out_dir, workers=workers, rank=info.rank, world_size=info.world_size, by_name=beside_selection
    )
    distributed.barrier()
    missing = [p for p in masked if not os.path.exists(p)]
    if missing:
        raise SeptError(
            f"masked shard {missing[0]} is missing: the run directory must be on a file system every node shares"
        )
    return masked


def open_stream(
    cfg: PretrainConfig, info: distributed.DistInfo, run_dir: str, plan: AccelerationPlan, *, pin_memory: bool
) -> tuple[PretrainStream, list[str], PoolIds]:
    """This rank's stream over ``cfg.data``, the shards it reads (masked copies for DetCon) and
    the pool ids of their samples."""
    keys, counts, pool_ids, selection_dir = None, None, PoolIds(), None
    if is_task_data(cfg.data):  # one task's subset of a selection's shared shards
        subset = open_task_data(cfg.data)
        # Counts come with the subset; each shard's keys are read only when a worker reads that shard.
        shards, keys, counts = list(subset.shards), subset.samples, subset.samples.counts.tolist()
        pool_ids = PoolIds(subset.samples)
        selection_dir = subset.selection_dir
        log.info(
            "task %s: %d samples in %d shared shards of %s", subset.task, len(subset), len(shards), subset.selection_dir
        )
    else:
        shards = list_shards(cfg.data)
    if needs_masks(cfg.method):
        shards = prepare_masks(cfg, shards, run_dir, info, selection_dir)
    stream = PretrainStream(
        shards,
        augment=ViewAugment(cfg.image_size, cfg.color_jitter, min_scale=cfg.crop_min_scale),
        batch_size=cfg.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        shard_counts=counts if keys is not None else shard_counts(cfg, shards, info.rank == 0),
        keys=keys,
        max_samples=cfg.max_samples,
        num_workers=cfg.num_workers or 0,
        plan=plan,
        num_masks=cfg.num_masks if needs_masks(cfg.method) else 0,
        pin_memory=pin_memory,
        cache_bytes=cfg.cache_mb << 20,
        run_ahead=0 if cfg.num_workers else cfg.run_ahead,
    )
    return stream, shards, pool_ids
