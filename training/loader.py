"""The pre-training data stream of one rank: WebDataset shards -> decoded images -> two views -> batches.

Epoch plan. Each epoch reads the shards in one order shared by every rank (a permutation drawn
from the seed and the epoch) which numbers its N samples 0 .. N-1 (N capped by
``max_samples``). Rank r owns the contiguous block [r*n, r*n + b*B) of that order, where
n = floor(N / world), b = floor(n / B) batches and B the batch size: every rank plans the same
number of batches, blocks are disjoint (so no key is read twice in an epoch), and a rank opens
only the shards its block touches, which also works with fewer shards than ranks (they split a
shard). Shard sizes come from a header-only count of each tar.

Workers. A rank's batches are dealt to its W loading workers (DataLoader processes, or one
in-process worker) in turn: worker w makes batches w, w+W, w+2W, ... from its own contiguous
part of the block, shuffled with a buffer, so each batch's index in the epoch, and so the
optimizer step it is made for, is known in the worker. The progressive schedules
(``sept.training.acceleration``) set each batch's image size and augmentation strength from that
step, and hard positive mining picks its crop pairs.

Resume. Every batch carries its worker and how many samples that worker had read when it was
made (``cursor``). The trainer keeps the latest of each (``EpochState``) in its checkpoint; a
resumed stream skips exactly those samples (reading tar bytes, not decoding), so it continues
at the same position of the same epoch. A sample's views depend only on the seed, the epoch and
the sample, never on which worker made it or whether it was skipped before.

Cache. A training set that fits in ``cache_bytes`` (a task's selection of a few thousand images
is typical) is read from its shards and decoded once, then served from memory: at the demo's
size an epoch lasts 4 steps, and re-reading and re-decoding every epoch took a quarter of each
step. Only the one-worker plan (``num_workers=0``) has one; DataLoader workers live for one
epoch. Cached or not, the stream yields the same batches.

Run-ahead. With ``run_ahead`` > 0 the one-worker plan runs in a background process that lasts
the whole run, epoch after epoch, up to that many batches ahead of the trainer (keeping its
cache), so loading overlaps the model's step on another core instead of taking turns with it.
The batches are the ones the training process would have made itself. If the trainer is not
where the process expects (a resume, an epoch ended early on another rank), it discards what
was made ahead, or restarts the process from the trainer's position.

Bad samples are skipped and counted (``sept.data.decode``); a worker that loses samples that
way ends its share short of a batch and the rank runs out of batches early. The trainer then
ends the epoch on every rank at the same step (an all-reduce each step), so ranks never wait
on each other and no sample is reused to fill the gap.
"""

from __future__ import annotations

import io
import logging
import signal
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sept.data.decode import decode_sample
from sept.data.identity import make_ids
from sept.data.samples import PoolSample, ShardStats, _split_member_name, iter_samples
from sept.errors import SeptError
from sept.training.acceleration import AccelerationPlan
from sept.training.augment import ViewAugment, as_uint8
from sept.training.keyed_random import keyed_uniforms, sample_keys

log = logging.getLogger(__name__)

MAX_BAD_RECORDS = 100
"""How many (key, reason) records of skipped samples a stream keeps (the count is exact)."""

MASK_STREAM = 2
"""The ``keyed_uniforms`` stream that orders a sample's mask labels (streams 0 and 1 draw its views)."""

MASK_MEMBER = "mask.png"
"""The WebDataset member holding a sample's segmentation label map (``sept.data.masks``)."""


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


def count_shard_samples(path: str) -> int:
    """Samples in one tar from its member headers alone (data is seeked over, not read); falls
    back to a full read (``iter_samples``, which also records damage) if the headers are bad."""
    try:
        count, last = 0, None
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _ = _split_member_name(info.name)
                if key is not None and key != last:
                    count, last = count + 1, key
                tar.members = []
        return count
    except (tarfile.TarError, OSError, EOFError):
        with closing(iter_samples(path, ShardStats())) as samples:
            return sum(1 for _ in samples)


def count_samples(shards: Sequence[str], limit: int | None = None) -> int:
    """The number of samples in ``shards``; with ``limit``, counting stops once that many are found."""
    total = 0
    for shard in shards:
        total += count_shard_samples(shard)
        if limit is not None and total >= limit:
            return min(total, limit)
    return total


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _buffer_shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """``items`` in a random order, holding at most ``size`` of them at a time."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _decode_mask(sample: PoolSample, size: tuple[int, int]) -> np.ndarray:
    data = sample.members.get(MASK_MEMBER)
    if data is None:
        raise ValueError(f"no {MASK_MEMBER} member (compute masks with sept.data.masks)")
    try:
        mask = np.asarray(Image.open(io.BytesIO(data)))
    except Exception as err:  # untrusted bytes: any decoder failure is a bad sample
        raise ValueError(f"undecodable {MASK_MEMBER}: {type(err).__name__}") from None
    if mask.ndim != 2 or mask.shape != (size[1], size[0]):
        raise ValueError(f"{MASK_MEMBER} of shape {mask.shape} does not match the {size[0]}x{size[1]} image")
    return mask.astype(np.uint8, copy=False)


class SampleCache:
    """Samples of shards read whole and their decoded images, kept while they fit in ``limit`` bytes.

    Counted: every member's bytes and every decoded image's pixels. The first entry that would
    pass the limit stops the filling; what is in stays and is still served."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0
        self.full = self.limit <= 0
        self.shards: dict[int, list[PoolSample]] = {}
        """Listing index -> the shard's wanted samples in tar order."""
        self.images: dict[tuple[int, int], tuple[torch.Tensor | None, list[tuple[str, str]]]] = {}
        """(listing index, position) -> (decoded uint8 image [3, H, W] or None, bad records of the decode)."""

    def _admit(self, nbytes: int) -> bool:
        if self.full or self.used + nbytes > self.limit:
            self.full = True
            return False
        self.used += nbytes
        return True

    def keep_shard(self, shard_index: int, samples: list[PoolSample]) -> None:
        if self._admit(sum(len(v) for s in samples for v in s.members.values())):
            self.shards[shard_index] = samples

    def keep_image(self, key: tuple[int, int], image: torch.Tensor | None, bad: list[tuple[str, str]]) -> None:
        nbytes = 0 if image is None else image.numel() * image.element_size()
        if self._admit(nbytes):
            self.images[key] = (image, bad)


def pick_mask_ids(mask1: torch.Tensor, mask2: torch.Tensor, count: int, priorities: np.ndarray) -> torch.Tensor:
    """Up to ``count`` distinct segment labels present in both views, those of highest
    ``priorities`` [256] (a sample's keyed uniforms, so a random choice), padded with -1: int64 [count]."""
    shared = np.intersect1d(mask1.unique().numpy(), mask2.unique().numpy())
    chosen = shared[np.argsort(-priorities[shared], kind="stable")][:count]
    out = torch.full((count,), -1, dtype=torch.int64)
    out[: len(chosen)] = torch.from_numpy(chosen.astype(np.int64))
    return out


class PretrainStream:
    """Batches of two views for rank ``rank`` of ``world_size`` (see module doc)."""

    def __init__(
        self,
        shards: Sequence[str],
        *,
        augment: ViewAugment,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shard_counts: Sequence[int] | None = None,
        max_samples: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        plan: AccelerationPlan | None = None,
        num_masks: int = 0,
        pin_memory: bool = False,
        keys: Sequence[frozenset[str] | None] | None = None,
        cache_bytes: int = 0,
        run_ahead: int = 0,
    ):
        if not shards:
            raise SeptError("no training shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if shard_counts is not None and len(shard_counts) != len(shards):
            raise ValueError(f"{len(shard_counts)} shard counts for {len(shards)} shards")
        if keys is not None and len(keys) != len(shards):
            raise ValueError(f"{len(keys)} key sets for {len(shards)} shards")
        self.keys = None if keys is None else [None if k is None else frozenset(k) for k in keys]
        """Per shard, the keys to read (a task's subset of shared shards); None reads every sample."""
        self.shards = list(shards)
        self.augment = augment
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.max_samples = max_samples
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.plan = plan
        self.num_masks = int(num_masks)
        self.pin_memory = pin_memory
        if run_ahead and self.num_workers:
            raise ValueError("run_ahead runs the one-worker plan (num_workers=0) in a background process")
        self.run_ahead = int(run_ahead)
        self._ahead: Iterator[TrainBatch] | None = None
        """The run-ahead process's batches, epoch after epoch (None: not started)."""
        self._pending: TrainBatch | None = None
        """A batch of a later epoch than the trainer's, held until the trainer gets there."""
        self.ahead_starts = 0
        """Run-ahead processes started (one for a run that never leaves the process's plan)."""
        # DataLoader workers live for one epoch: a cache there would be filled (shards read past
        # their share) and thrown away every epoch.
        self.cache = SampleCache(cache_bytes if self.num_workers == 0 else 0)
        if shard_counts is None and self.keys is not None and all(k is not None for k in self.keys):
            shard_counts = [len(k) for k in self.keys]
        self._counts = None if shard_counts is None else [int(c) for c in shard_counts]
        self.images_read = 0
        """Images this rank put into consumed batches."""
        self.bad = 0
        """Samples of this rank's share skipped as bad."""
        self.bad_samples: list[tuple[str, str]] = []

    # --- sizes ------------------------------------------------------------------------------

    @property
    def shard_counts(self) -> list[int]:
        if self._counts is None:
            self._counts = [count_shard_samples(s) for s in self.shards]
        return self._counts

    @property
    def num_samples(self) -> int:
        """Samples used per epoch: all of the shards, capped by max_samples."""
        n = sum(self.shard_counts)
        return n if self.max_samples is None else min(n, int(self.max_samples))

    @property
    def samples_per_rank(self) -> int:
        return self.num_samples // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank plans per epoch (fewer only if bad samples end it early)."""
        batches = self.samples_per_rank // self.batch_size
        if batches < 1:
            raise SeptError(
                f"too little training data: {self.num_samples} samples in {len(self.shards)} shards"
                f" (first {self.shards[0]}) give {self.samples_per_rank} per rank for {self.world_size}"
                f" ranks, fewer than one batch of {self.batch_size}"
            )
        return batches

    def logical_workers(self) -> int:
        """Loading workers of an epoch (at least 1; never more than its batches)."""
        return max(1, min(self.num_workers, self.batches_per_epoch))

    # --- the plan -----------------------------------------------------------------------------

    def _worker_range(self, w: int, workers: int) -> tuple[int, int, int]:
        """(first, stop) epoch-order index of worker ``w``'s share and its batch count."""
        batches = self.batches_per_epoch
        counts = [len(range(v, batches, workers)) for v in range(workers)]
        first = self.rank * self.samples_per_rank + sum(counts[:w]) * self.batch_size
        return first, first + counts[w] * self.batch_size, counts[w]

    def _read_range(self, epoch: int, first: int, stop: int) -> Iterator[tuple[int, PoolSample]]:
        """(listing index, sample) of epoch-order indices [first, stop), in order."""
        order = np.random.default_rng(_seed(self.seed, epoch)).permutation(len(self.shards))
        offset = 0
        for shard_index in order:
            count = self.shard_counts[shard_index]
            lo, hi = max(first, offset) - offset, min(stop, offset + count) - offset
            offset += count
            if hi <= lo:
                if offset >= stop:
                    return
                continue
            cached = self.cache.shards.get(int(shard_index))
            if cached is not None:
                # Cached shards hold the wanted samples only, so list positions are the ranks below.
                for sample in cached[lo:hi]:
                    yield int(shard_index), sample
            else:
                yield from self._read_shard(int(shard_index), lo, hi, count)
            if offset >= stop:
                return

    def _read_shard(self, shard_index: int, lo: int, hi: int, count: int) -> Iterator[tuple[int, PoolSample]]:
        """(listing index, sample) of the wanted samples [lo, hi) of one shard of ``count``. While
        the cache has room the shard is read to its end and offered to it, so later epochs find
        it whole whichever part of it they need."""
        wanted = None if self.keys is None else self.keys[shard_index]
        keep = None if self.cache.full else []
        end = hi if keep is None else count
        with closing(iter_samples(self.shards[shard_index], ShardStats())) as samples:
            # With a key set, positions count the wanted samples only; ids keep the real position.
            rank_in_shard = -1
            for sample in samples:
                if wanted is not None and sample.key not in wanted:
                    continue
                rank_in_shard = sample.position if wanted is None else rank_in_shard + 1
                if rank_in_shard >= end:
                    break
                if keep is not None:
                    keep.append(sample)
                if lo <= rank_in_shard < hi:
                    yield shard_index, sample
        # Only a shard that held as many samples as counted (no truncated tail) is served from memory.
        if keep is not None and len(keep) == count:
            self.cache.keep_shard(shard_index, keep)

    # --- making batches -----------------------------------------------------------------------

    def _make_row(self, shard_index: int, sample: PoolSample, bad: list) -> tuple | None:
        """(sample id, key, uint8 image [3, H, W], mask or None) of a good sample; None (and its
        skip records in ``bad``) for a bad one."""
        image, decode_bad = self._decoded(shard_index, sample)
        if image is None:
            bad.extend(decode_bad)
            return None
        sample_id = int(make_ids(shard_index, [sample.position])[0])
        mask = None
        if self.num_masks:
            try:
                mask = torch.from_numpy(_decode_mask(sample, (image.shape[2], image.shape[1])).copy())
            except ValueError as err:
                bad.append((sample.key, str(err)))
                return None
        return sample_id, sample.key, image, mask

    def _decoded(self, shard_index: int, sample: PoolSample) -> tuple[torch.Tensor | None, list[tuple[str, str]]]:
        """The sample's uint8 image [3, H, W] (None if bad) and its skip records, from the cache
        when it holds them."""
        key = (shard_index, sample.position)
        if (hit := self.cache.images.get(key)) is not None:
            return hit
        stats = ShardStats()
        decoded = decode_sample(sample, stats)
        image = None if decoded is None else as_uint8(decoded)
        bad = list(stats.bad_samples)
        self.cache.keep_image(key, image, bad)
        return image, bad

    def _collate(self, epoch: int, rows: list[tuple], bad: list, step: int, **where) -> TrainBatch:
        """The batch of ``rows`` made for optimizer ``step``: its views keyed by each sample (so
        they depend on the seed, the epoch and the sample alone), sized and softened as the
        plan says for that step."""
        plan = self.plan
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        keys = sample_keys(self.seed, epoch, ids)
        views = self.augment.views(
            [r[2] for r in rows],
            keys,
            size=plan.image_size_at(step) if plan else None,
            strength=plan.strength_at(step) if plan else 1.0,
            candidates=plan.positive_candidates if plan else 1,
            masks=[r[3] for r in rows] if self.num_masks else None,
        )
        batch = TrainBatch(
            view1=views.view1,
            view2=views.view2,
            ids=torch.from_numpy(ids),
            keys=[r[1] for r in rows],
            bad=bad,
            step=step,
            epoch=epoch,
            **where,
        )
        if self.num_masks:
            batch.mask1, batch.mask2 = views.mask1, views.mask2
            priorities = keyed_uniforms(keys, 256, MASK_STREAM)
            batch.mask_ids = torch.stack(
                [pick_mask_ids(m1, m2, self.num_masks, p) for m1, m2, p in zip(views.mask1, views.mask2, priorities)]
            )
        return batch

    def _produce(
        self, epoch: int, worker: int, workers: int, start_step: int, items: int, made: int
    ) -> Iterator[TrainBatch]:
        """Worker ``worker``'s batches of ``epoch`` after its first ``items`` samples and ``made``
        batches (a resume), until its share ends."""
        first, stop, planned = self._worker_range(worker, workers)
        rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, workers, worker))
        shuffled = _buffer_shuffled(self._read_range(epoch, first, stop), self.shuffle_buffer, rng)
        rows: list[tuple] = []
        bad: list[tuple[str, str]] = []
        read = 0
        for shard_index, sample in shuffled:
            read += 1
            if read <= items:
                continue  # consumed before the resume: skipped without decoding
            if made >= planned:
                break
            row = self._make_row(shard_index, sample, bad)
            if row is None:
                continue
            rows.append(row)
            if len(rows) == self.batch_size:
                index = worker + made * workers
                yield self._collate(epoch, rows, bad, start_step + index, worker=worker, cursor=read, index=index)
                rows, bad = [], []
                made += 1
        if made < planned:
            log.warning(
                "rank %d worker %d: epoch %d share ended %d batches short (%d bad samples in the last batch)",
                self.rank,
                worker,
                epoch,
                planned - made,
                len(bad),
            )

    def record(self, batch: TrainBatch) -> None:
        """Counts a batch the trainer consumed (images read, bad samples met on the way)."""
        self.images_read += len(batch)
        self.bad += len(batch.bad)
        room = MAX_BAD_RECORDS - len(self.bad_samples)
        if room > 0:
            self.bad_samples.extend(batch.bad[:room])
        for key, reason in batch.bad:
            log.debug("skipped training sample %s: %s", key, reason)

    def epoch(self, state: EpochState | int) -> Iterator[TrainBatch]:
        """The batches of ``state.epoch`` not yet consumed according to ``state`` (an epoch
        number: all of that epoch, its first batch made for step 0), in planned order; ends
        early only if bad samples left a worker short. The caller advances ``state`` with each
        batch it consumes."""
        if isinstance(state, int):
            state = EpochState.fresh(state, 0, self.logical_workers())
        workers = state.num_workers
        if workers != self.logical_workers():
            raise ValueError(f"epoch state has {workers} workers, this stream {self.logical_workers()}")
        if self.run_ahead:
            yield from self._epoch_from_ahead(state)
            return
        rotation = state.consumed % workers  # the worker whose batch comes next
        if self.num_workers == 0:
            source = self._produce(state.epoch, 0, 1, state.start_step, state.items[0], state.batches[0])
        else:
            dataset = _EpochDataset(self, state, rotation)
            loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory)
            source = iter(loader)
        try:
            yield from source
        finally:
            if self.num_workers == 0:
                source.close()
            del source  # shuts the worker processes down

    def _epoch_from_ahead(self, state: EpochState) -> Iterator[TrainBatch]:
        """``epoch(state)`` served by the run-ahead process (see module doc)."""
        if self._ahead is None:
            self._start_ahead(state)
        restarted, due = False, state.consumed
        while True:
            batch, self._pending = self._pending, None
            if batch is None:
                batch = next(self._ahead, None)
            if batch is None:
                return  # the process stopped after an epoch without a single batch
            if batch.epoch < state.epoch:
                continue  # the rest of an epoch the trainer ended early (another rank ran out)
            if batch.epoch > state.epoch:
                self._pending = batch  # this epoch ended (short: bad samples); keep it for the next
                return
            if batch.index != due or batch.step != state.start_step + due:
                if restarted:
                    raise RuntimeError(
                        f"run-ahead loader made batch {batch.index} (step {batch.step}) where"
                        f" batch {due} (step {state.start_step + due}) was due"
                    )
                self._start_ahead(state)
                restarted = True
                continue
            due += 1
            yield batch

    def _start_ahead(self, state: EpochState) -> None:
        self.close()
        self.ahead_starts += 1
        loader = DataLoader(
            _RunAheadDataset(self, state),
            batch_size=None,
            num_workers=1,
            prefetch_factor=self.run_ahead,
            pin_memory=self.pin_memory,
        )
        self._ahead = iter(loader)

    def close(self) -> None:
        """Stops the run-ahead process, if any (what it made ahead is dropped)."""
        self._ahead, self._pending = None, None  # the DataLoader iterator shuts its worker down when freed


def _ignore_job_signals() -> None:
    # SLURM signals every process of a step: the warning (USR2) and TERM are the training
    # process's to handle (checkpoint, then stop its workers), so workers must not die of them.
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class _EpochDataset(IterableDataset):
    """One epoch of a stream, split among DataLoader workers; DataLoader worker i plays logical
    worker (i + rotation) % W, so a resumed epoch asks first for the batch that comes next."""

    def __init__(self, stream: PretrainStream, state: EpochState, rotation: int):
        self.stream, self.state, self.rotation = stream, state, rotation

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        workers = self.state.num_workers
        worker = 0 if info is None else (info.id + self.rotation) % workers
        if info is not None:
            torch.set_num_threads(1)  # workers share the node's cores with the training process
            _ignore_job_signals()
        s = self.state
        return self.stream._produce(s.epoch, worker, workers, s.start_step, s.items[worker], s.batches[worker])


class _RunAheadDataset(IterableDataset):
    """The one-worker plan from ``state`` on, epoch after epoch, in a single DataLoader worker
    that lasts the run; ends after an epoch that made no batch (nothing decodable)."""

    def __init__(self, stream: PretrainStream, state: EpochState):
        self.stream, self.state = stream, state

    def __iter__(self) -> Iterator[TrainBatch]:
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # the training process computes on the other cores
            _ignore_job_signals()
        s = self.state
        epoch, start_step, items, made = s.epoch, s.start_step, s.items[0], s.batches[0]
        while True:
            made_now = 0
            for batch in self.stream._produce(epoch, 0, 1, start_step, items, made):
                made_now += 1
                yield batch
            if made_now == 0 and made == 0:
                return
            # The trainer starts the next epoch at the step after this one's last batch.
            epoch, start_step, items, made = epoch + 1, start_step + made + made_now, 0, 0
