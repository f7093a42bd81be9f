"""What a training batch is and where a rank stands in its epoch: ``TrainBatch``, ``EpochState``
and ``collate``, which turns decoded samples into a batch of two views.

A batch's views are keyed by each sample (seed, epoch, sample id), never by the worker that
made it, so any worker, or a resumed stream, makes the same batch for the same samples. A batch
carries its place in the epoch (worker, cursor, index, step), which is what ``EpochState``
records for a checkpoint. DetCon batches also carry the segment labels to pool, drawn from each
sample's own keyed uniforms (``pick_mask_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sept.training.acceleration import AccelerationPlan
from sept.training.augment import ViewAugment
from sept.training.decoding import DecodedSample
from sept.training.keyed_random import keyed_uniforms, sample_keys

MASK_STREAM = 2
"""The ``keyed_uniforms`` stream that orders a sample's mask labels (streams 0 and 1 draw its views)."""


@dataclass
class TrainBatch:
    """Two augmented views of ``len(keys)`` images, which pool samples they came from, and
    where the batch sits in its epoch."""

    view1: torch.Tensor
    view2: torch.Tensor
    ids: torch.Tensor
    """int64 sample ids (``sept.data.identity.make_ids`` of listing index and position)."""
    keys: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) of the samples skipped while this batch was assembled."""
    mask1: torch.Tensor | None = None
    """uint8 [B, S, S] segment labels of view1 (DetCon), else None."""
    mask2: torch.Tensor | None = None
    mask_ids: torch.Tensor | None = None
    """int64 [B, K]: the segment labels to pool per image (present in both views), -1 = none."""
    worker: int = 0
    cursor: int = 0
    """Samples the making worker had read from its share of the epoch, this batch's included."""
    index: int = 0
    """The batch's planned index in its epoch."""
    step: int = 0
    """The optimizer step the batch was made for (its image size and strength follow it)."""
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> TrainBatch:
        """This batch with its tensors in page-locked memory (DataLoader calls it with
        ``pin_memory=True``), so copies to the GPU can overlap compute."""
        for name in ("view1", "view2", "ids", "mask1", "mask2", "mask_ids"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.pin_memory())
        return self


@dataclass
class EpochState:
    """Where a rank is in an epoch: enough to resume it exactly (saved in checkpoints)."""

    epoch: int
    start_step: int
    """The optimizer step at which the epoch began."""
    num_workers: int
    items: list[int]
    """Per worker: samples read from its share (bad ones included) by its last consumed batch."""
    batches: list[int]
    """Per worker: batches consumed."""

    @classmethod
    def fresh(cls, epoch: int, start_step: int, num_workers: int) -> EpochState:
        return cls(epoch, start_step, num_workers, [0] * num_workers, [0] * num_workers)

    def advance(self, batch: TrainBatch) -> None:
        self.items[batch.worker] = batch.cursor
        self.batches[batch.worker] += 1

    @property
    def consumed(self) -> int:
        return sum(self.batches)

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "start_step": self.start_step,
            "num_workers": self.num_workers,
            "items": list(self.items),
            "batches": list(self.batches),
        }

    @classmethod
    def from_dict(cls, d: dict) -> EpochState:
        return cls(
            int(d["epoch"]),
            int(d["start_step"]),
            int(d["num_workers"]),
            [int(x) for x in d["items"]],
            [int(x) for x in d["batches"]],
        )


def pick_mask_ids(mask1: torch.Tensor, mask2: torch.Tensor, count: int, priorities: np.ndarray) -> torch.Tensor:
    """Up to ``count`` distinct segment labels present in both views, those of highest
    ``priorities`` [256] (a sample's keyed uniforms, so a random choice), padded with -1: int64 [count]."""
    shared = np.intersect1d(mask1.unique().numpy(), mask2.unique().numpy())
    chosen = shared[np.argsort(-priorities[shared], kind="stable")][:count]
    out = torch.full((count,), -1, dtype=torch.int64)
    out[: len(chosen)] = torch.from_numpy(chosen.astype(np.int64))
    return out


def collate(
    rows: list[DecodedSample],
    bad: list[tuple[str, str]],
    *,
    augment: ViewAugment,
    plan: AccelerationPlan | None,
    seed: int,
    epoch: int,
    step: int,
    num_masks: int = 0,
    **where: int,
) -> TrainBatch:
    """The batch of ``rows`` made for optimizer ``step``: its views keyed by each sample (so
    they depend on the seed, the epoch and the sample alone), sized and softened as the
    plan says for that step; ``where`` is the batch's place in its epoch (worker, cursor, index)."""
    ids = np.array([r.sample_id for r in rows], dtype=np.int64)
    keys = sample_keys(seed, epoch, ids)
    views = augment.views(
        [r.image for r in rows],
        keys,
        size=plan.image_size_at(step) if plan else None,
        strength=plan.strength_at(step) if plan else 1.0,
        candidates=plan.positive_candidates if plan else 1,
        masks=[r.mask for r in rows] if num_masks else None,
    )
    batch = TrainBatch(
        view1=views.view1,
        view2=views.view2,
        ids=torch.from_numpy(ids),
        keys=[r.key for r in rows],
        bad=bad,
        step=step,
        epoch=epoch,
        **where,
    )
    if num_masks:
        batch.mask1, batch.mask2 = views.mask1, views.mask2
        priorities = keyed_uniforms(keys, 256, MASK_STREAM)
        batch.mask_ids = torch.stack(
            [pick_mask_ids(m1, m2, num_masks, p) for m1, m2, p in zip(views.mask1, views.mask2, priorities)]
        )
    return batch
