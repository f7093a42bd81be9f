"""Which samples of an epoch each rank and each of its loading workers reads, and in what order.

Epoch plan. Each epoch reads the shards in one order shared by every rank (a permutation drawn
from the seed and the epoch) which numbers its N samples 0 .. N-1 (N capped by
``max_samples``). Rank r owns the contiguous block [r*n, r*n + b*B) of that order, where
n = floor(N / world), b = floor(n / B) batches and B the batch size: every rank plans the same
number of batches, blocks are disjoint (so no key is read twice in an epoch), and a rank opens
only the shards its block touches, which also works with fewer shards than ranks (they split a
shard). Shard sizes come from a header-only count of each tar.

Workers. A rank's batches are dealt to its W loading workers in turn: worker w makes batches
w, w+W, w+2W, ... from its own contiguous part of the block, shuffled with a buffer seeded by
the epoch, the rank and the worker, so each batch's index in the epoch is known in the worker.

This module decides and reads; it never decodes (``sept.training.decoding``) nor batches
(``sept.training.batching``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing

import numpy as np

from sept.data.samples import PoolSample, ShardStats, iter_samples
from sept.data.tar_scan import UnsupportedTar, open_tar, scan_samples
from sept.errors import SeptError
from sept.training.decoding import SampleCache


def count_shard_samples(path: str) -> int:
    """Samples in one tar from its member headers alone (``sept.data.tar_scan``: data is seeked
    over, not read); a tar the scanner does not follow (compressed, damaged, remote) is counted
    by a full read (``iter_samples``, which also records damage)."""
    try:
        with open_tar(path) as buf:
            return sum(1 for _ in scan_samples(buf))
    except (UnsupportedTar, OSError, ValueError):
        pass
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


def seed_of(*parts: int) -> int:
    """One generator seed from integers (the run's seed, the epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def buffer_shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
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


class ShardAssignment:
    """The epoch plan of rank ``rank`` of ``world_size`` over ``shards`` (see module doc)."""

    def __init__(
        self,
        shards: Sequence[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shard_counts: Sequence[int] | None,
        keys: Sequence[frozenset[str] | None] | None,
        max_samples: int | None,
        num_workers: int,
    ):
        self.shards = list(shards)
        self.keys = keys
        """Per shard, the keys to read (a task's subset of shared shards); None reads every sample.
        Indexed only when a shard is read, so a ``TaskSamples`` reads one shard's keys at a time
        (pass ``shard_counts`` with it: counting by ``len`` would read them all)."""
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.max_samples = max_samples
        self.num_workers = int(num_workers)
        if shard_counts is None and keys is not None and all(k is not None for k in keys):
            shard_counts = [len(k) for k in keys]
        self._counts = None if shard_counts is None else [int(c) for c in shard_counts]

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

    def worker_range(self, w: int, workers: int) -> tuple[int, int, int]:
        """(first, stop) epoch-order index of worker ``w``'s share and its batch count."""
        batches = self.batches_per_epoch
        counts = [len(range(v, batches, workers)) for v in range(workers)]
        first = self.rank * self.samples_per_rank + sum(counts[:w]) * self.batch_size
        return first, first + counts[w] * self.batch_size, counts[w]

    def worker_share(
        self, epoch: int, worker: int, workers: int, shuffle_buffer: int, cache: SampleCache
    ) -> tuple[int, Iterator[tuple[int, PoolSample]]]:
        """Worker ``worker``'s planned batch count in ``epoch`` and the (listing index, sample) of
        its share in the order it batches them."""
        first, stop, planned = self.worker_range(worker, workers)
        rng = np.random.default_rng(seed_of(self.seed, epoch, self.rank, workers, worker))
        return planned, buffer_shuffled(self.read_range(epoch, first, stop, cache), shuffle_buffer, rng)

    def read_range(self, epoch: int, first: int, stop: int, cache: SampleCache) -> Iterator[tuple[int, PoolSample]]:
        """(listing index, sample) of epoch-order indices [first, stop), in order."""
        order = np.random.default_rng(seed_of(self.seed, epoch)).permutation(len(self.shards))
        offset = 0
        for shard_index in order:
            count = self.shard_counts[shard_index]
            lo, hi = max(first, offset) - offset, min(stop, offset + count) - offset
            offset += count
            if hi <= lo:
                if offset >= stop:
                    return
                continue
            cached = cache.shards.get(int(shard_index))
            if cached is not None:
                # Cached shards hold the wanted samples only, so list positions are the ranks below.
                for sample in cached[lo:hi]:
                    yield int(shard_index), sample
            else:
                yield from self._read_shard(int(shard_index), lo, hi, count, cache)
            if offset >= stop:
                return

    def _read_shard(
        self, shard_index: int, lo: int, hi: int, count: int, cache: SampleCache
    ) -> Iterator[tuple[int, PoolSample]]:
        """(listing index, sample) of the wanted samples [lo, hi) of one shard of ``count``. While
        the cache has room the shard is read to its end and offered to it, so later epochs find
        it whole whichever part of it they need."""
        wanted = None if self.keys is None else self.keys[shard_index]
        keep = None if cache.full else []
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
            cache.keep_shard(shard_index, keep)
