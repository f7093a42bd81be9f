"""The pre-training data stream of one rank: WebDataset shards -> decoded images -> two views -> batches.

``PretrainStream`` is the loop that ties the roles together: ``sept.training.shard_assignment``
decides which samples each rank and loading worker reads (the epoch plan), ``sept.training.decoding``
turns them into images (and keeps the cache), and ``sept.training.batching`` makes the batches
and records where a rank stands in its epoch. Workers are DataLoader processes, or one
in-process worker; each batch's index in the epoch, and so the optimizer step it is made for,
is known in the worker, so the progressive schedules (``sept.training.acceleration``) set each
batch's image size and augmentation strength from that step, and hard positive mining picks its
crop pairs.

Resume. Every batch carries its worker and how many samples that worker had read when it was
made (``cursor``). The trainer keeps the latest of each (``EpochState``) in its checkpoint; a
resumed stream skips exactly those samples (reading tar bytes, not decoding), so it continues
at the same position of the same epoch. A sample's views depend only on the seed, the epoch and
the sample, never on which worker made it or whether it was skipped before.

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

import logging
import signal
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sept.errors import SeptError
from sept.training.acceleration import AccelerationPlan
from sept.training.augment import ViewAugment
from sept.training.batching import EpochState, TrainBatch, collate
from sept.training.decoding import DecodedSample, SampleCache, decode_for_batch
from sept.training.shard_assignment import ShardAssignment

log = logging.getLogger(__name__)

MAX_BAD_RECORDS = 100
"""How many (key, reason) records of skipped samples a stream keeps (the count is exact)."""


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
        self.shards = list(shards)
        self.augment = augment
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.plan = plan
        self.num_masks = int(num_masks)
        self.pin_memory = pin_memory
        if run_ahead and self.num_workers:
            raise ValueError("run_ahead runs the one-worker plan (num_workers=0) in a background process")
        self.run_ahead = int(run_ahead)
        self.assignment = ShardAssignment(
            self.shards,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shard_counts=shard_counts,
            keys=keys,
            max_samples=max_samples,
            num_workers=self.num_workers,
        )
        self._ahead: Iterator[TrainBatch] | None = None
        """The run-ahead process's batches, epoch after epoch (None: not started)."""
        self._pending: TrainBatch | None = None
        """A batch of a later epoch than the trainer's, held until the trainer gets there."""
        self.ahead_starts = 0
        """Run-ahead processes started (one for a run that never leaves the process's plan)."""
        # DataLoader workers live for one epoch: a cache there would be filled (shards read past
        # their share) and thrown away every epoch.
        self.cache = SampleCache(cache_bytes if self.num_workers == 0 else 0)
        self.images_read = 0
        """Images this rank put into consumed batches."""
        self.bad = 0
        """Samples of this rank's share skipped as bad."""
        self.bad_samples: list[tuple[str, str]] = []

    # --- the plan (``ShardAssignment``) -----------------------------------------------------

    @property
    def shard_counts(self) -> list[int]:
        return self.assignment.shard_counts

    @property
    def num_samples(self) -> int:
        """Samples used per epoch: all of the shards, capped by max_samples."""
        return self.assignment.num_samples

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank plans per epoch (fewer only if bad samples end it early)."""
        return self.assignment.batches_per_epoch

    def logical_workers(self) -> int:
        """Loading workers of an epoch (at least 1; never more than its batches)."""
        return self.assignment.logical_workers()

    # --- making batches -----------------------------------------------------------------------

    def _produce(
        self, epoch: int, worker: int, workers: int, start_step: int, items: int, made: int
    ) -> Iterator[TrainBatch]:
        """Worker ``worker``'s batches of ``epoch`` after its first ``items`` samples and ``made``
        batches (a resume), until its share ends."""
        planned, shuffled = self.assignment.worker_share(epoch, worker, workers, self.shuffle_buffer, self.cache)
        rows: list[DecodedSample] = []
        bad: list[tuple[str, str]] = []
        read = 0
        for shard_index, sample in shuffled:
            read += 1
            if read <= items:
                continue  # consumed before the resume: skipped without decoding
            if made >= planned:
                break
            row = decode_for_batch(self.cache, shard_index, sample, bad, with_mask=bool(self.num_masks))
            if row is None:
                continue
            rows.append(row)
            if len(rows) == self.batch_size:
                index = worker + made * workers
                yield collate(
                    rows,
                    bad,
                    augment=self.augment,
                    plan=self.plan,
                    seed=self.seed,
                    epoch=epoch,
                    step=start_step + index,
                    num_masks=self.num_masks,
                    worker=worker,
                    cursor=read,
                    index=index,
                )
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
