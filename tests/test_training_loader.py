"""The training stream: disjoint rank shares, equal batch counts, no key twice per epoch (also with
fewer shards than ranks), exact resume, skip-and-count of bad samples, progressive sizes, masks."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sept.data.identity import split_ids
from sept.data.shards import list_shards
from sept.errors import SeptError
from sept.training.acceleration import AccelerationPlan
from sept.training.augment import ViewAugment, two_views
from sept.training.batching import EpochState
from sept.training.loader import PretrainStream
from sept.training.shard_assignment import count_samples, count_shard_samples

torch.set_num_threads(1)


def make_pool(directory, shard_sizes, bad=(), size=16, seed=0, masks=False):
    """WebDataset shards of random JPEGs; ``bad`` = (shard, index) pairs with undecodable bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard, count in enumerate(shard_sizes):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as writer:
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
                image = b"not a jpeg" if (shard, i) in bad else buffer.getvalue()
                sample = {"__key__": f"{shard:05d}{i:04d}", "jpg": image, "json": b"{}"}
                if masks:  # four quadrant segments
                    labels = np.zeros((size, size), np.uint8)
                    (
                        labels[: size // 2, size // 2 :],
                        labels[size // 2 :, : size // 2],
                        labels[size // 2 :, size // 2 :],
                    ) = 1, 2, 3
                    png = io.BytesIO()
                    Image.fromarray(labels, mode="L").save(png, "PNG")
                    sample["mask.png"] = png.getvalue()
                writer.write(sample)
    return list_shards(str(directory))


def _stream(shards, rank, world, **kwargs):
    return PretrainStream(
        shards, augment=ViewAugment(16), batch_size=kwargs.pop("batch_size", 4), rank=rank, world_size=world, **kwargs
    )


def _keys(batches):
    return [k for b in batches for k in b.keys]


@pytest.mark.parametrize("sizes, per_rank_batches", [([13, 9, 11], 4), ([21], 2)], ids=["3-shards", "1-shard"])
def test_two_ranks_get_equal_batches_of_disjoint_samples(tmp_path, sizes, per_rank_batches):
    shards = make_pool(tmp_path / "pool", sizes)
    assert count_samples(shards) == sum(sizes)
    per_rank = []
    for rank in range(2):
        stream = _stream(shards, rank, 2)
        batches = list(stream.epoch(0))
        assert stream.batches_per_epoch == per_rank_batches and len(batches) == per_rank_batches
        for batch in batches:
            assert batch.view1.shape == batch.view2.shape == (4, 3, 16, 16)
            assert not torch.equal(batch.view1, batch.view2)
        keys = _keys(batches)
        assert len(keys) == len(set(keys)) == 4 * per_rank_batches  # no key twice in the epoch
        assert [b.index for b in batches] == list(range(per_rank_batches))
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]


def test_a_rank_opens_only_the_shards_its_block_touches(tmp_path, monkeypatch):
    shards = make_pool(tmp_path / "pool", [8, 8, 8, 8])
    import sept.training.shard_assignment as shard_assignment

    opened = []
    real = shard_assignment.iter_samples
    monkeypatch.setattr(
        shard_assignment, "iter_samples", lambda path, stats=None: opened.append(path) or real(path, stats)
    )
    list(_stream(shards, 1, 2).epoch(0))
    assert len(opened) == 2  # 16 samples of 32: two of the four shards


def test_header_count_matches_a_full_read(tmp_path):
    shards = make_pool(tmp_path / "pool", [7, 0, 3])
    assert [count_shard_samples(s) for s in shards] == [7, 0, 3]


def test_a_compressed_shard_is_counted_by_a_full_read(tmp_path):
    import gzip

    (plain,) = make_pool(tmp_path / "pool", [5])
    zipped = tmp_path / "pool" / "zipped.tar.gz"
    zipped.write_bytes(gzip.compress(Path(plain).read_bytes()))
    assert count_shard_samples(str(zipped)) == 5


def test_ids_name_the_samples(tmp_path):
    shards = make_pool(tmp_path / "pool", [6, 6])
    batch = next(_stream(shards, 0, 1).epoch(0))
    shard_index, position = split_ids(batch.ids.numpy())
    for key, s, p in zip(batch.keys, shard_index, position):
        assert key == f"{s:05d}{p:04d}"


def test_epochs_reshuffle_but_repeat_for_the_same_seed(tmp_path):
    shards = make_pool(tmp_path / "pool", [8, 8, 8])
    keys = lambda stream, e: _keys(stream.epoch(e))  # noqa: E731
    first = keys(_stream(shards, 0, 1), 0)
    assert keys(_stream(shards, 0, 1), 0) == first
    second = keys(_stream(shards, 0, 1), 1)
    assert sorted(second) == sorted(first) and second != first
    views = lambda: next(_stream(shards, 0, 1).epoch(3)).view1  # noqa: E731
    assert torch.equal(views(), views())


def test_bad_samples_are_skipped_counted_and_never_replaced_by_repeats(tmp_path):
    shards = make_pool(tmp_path / "pool", [10, 10], bad={(0, 2), (1, 5), (1, 7)})
    bad_keys = {"000000002", "000010005", "000010007"}
    seen, bad = [], 0
    for rank in range(2):
        stream = _stream(shards, rank, 2, batch_size=3)
        batches = list(stream.epoch(0))
        for b in batches:
            stream.record(b)
        assert stream.batches_per_epoch == 3 and len(batches) <= 3  # short of a batch if its share lost samples
        assert all(len(b) == 3 for b in batches)
        keys = _keys(batches)
        assert len(keys) == len(set(keys)) and not set(keys) & bad_keys
        seen += keys
        bad += stream.bad
        assert all(reason.startswith("jpg: undecodable") for _, reason in stream.bad_samples)
    assert len(seen) == len(set(seen))
    assert bad <= 3 and len(seen) + bad <= 18


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_epoch_exactly(tmp_path, num_workers):
    shards = make_pool(tmp_path / "pool", [14, 10])
    full = list(_stream(shards, 1, 2, num_workers=num_workers).epoch(EpochState.fresh(2, 100, max(1, num_workers))))
    assert len(full) == 3 and [b.step for b in full] == [100, 101, 102]

    stream = _stream(shards, 1, 2, num_workers=num_workers)
    state = EpochState.fresh(2, 100, max(1, num_workers))
    for batch in stream.epoch(state):  # consume two batches, then "preempt"
        state.advance(batch)
        if state.consumed == 2:
            break
    restored = EpochState.from_dict(state.to_dict())
    rest = list(_stream(shards, 1, 2, num_workers=num_workers).epoch(restored))
    assert [b.keys for b in rest] == [b.keys for b in full[2:]]
    assert [b.step for b in rest] == [102]
    assert torch.equal(rest[0].view1, full[2].view1)  # the same views, not just the same samples


def test_workers_keep_shares_disjoint_and_counts_equal(tmp_path):
    shards = make_pool(tmp_path / "pool", [12, 12])
    batches = list(_stream(shards, 1, 2, num_workers=2).epoch(0))
    assert len(batches) == 3 and [b.index for b in batches] == [0, 1, 2]
    assert len(set(_keys(batches))) == 12
    alone = set(_keys(_stream(shards, 1, 2).epoch(0)))
    assert set(_keys(batches)) == alone


def test_max_samples_caps_the_epoch(tmp_path):
    shards = make_pool(tmp_path / "pool", [10, 10])
    stream = _stream(shards, 0, 1, max_samples=8)
    assert stream.num_samples == 8 and len(list(stream.epoch(0))) == 2


def test_too_little_data_is_a_clear_error(tmp_path):
    shards = make_pool(tmp_path / "pool", [5])
    with pytest.raises(SeptError, match="too little training data: 5 samples"):
        _ = _stream(shards, 0, 2, batch_size=4).batches_per_epoch


def test_progressive_plan_sets_each_batch_size(tmp_path):
    shards = make_pool(tmp_path / "pool", [16])
    plan = AccelerationPlan(
        steps=4,
        base_lr=0.1,
        warmup_steps=0,
        image_size=16,
        lr_schedule="cyclic",
        cycle_steps=4,
        progressive=True,
        min_image_size=8,
        min_strength=0.5,
        stages=2,
    )
    batches = list(_stream(shards, 0, 1, plan=plan).epoch(0))
    assert [b.view1.shape[-1] for b in batches] == [8, 8, 16, 16]


def test_masks_travel_with_their_views(tmp_path):
    shards = make_pool(tmp_path / "pool", [8], masks=True)
    batch = next(_stream(shards, 0, 1, num_masks=16).epoch(0))
    assert batch.mask1.shape == batch.mask2.shape == (4, 16, 16) and batch.mask1.dtype == torch.uint8
    assert batch.mask_ids.shape == (4, 16)
    for ids, m1, m2 in zip(batch.mask_ids, batch.mask1, batch.mask2):
        chosen = set(ids[ids >= 0].tolist())
        assert chosen and chosen <= set(m1.unique().tolist()) & set(m2.unique().tolist())
        assert (ids == -1).sum() == 16 - len(chosen)
    missing = make_pool(tmp_path / "plain", [8])
    stream = _stream(missing, 0, 1, num_masks=16)
    assert list(stream.epoch(0)) == []  # every sample lacks its mask: skipped, none reused


def test_two_views_helper():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    a, b = two_views(image, image_size=24)
    assert a.shape == b.shape == (3, 24, 24) and a.dtype == torch.float32
    assert not torch.equal(a, b)


def _epochs(stream, epochs):
    """Per epoch: (keys, view1, view2) of every batch, and how many samples were skipped as bad."""
    out = []
    for e in epochs:
        batches = list(stream.epoch(e))
        out.append(
            (
                [b.keys for b in batches],
                [b.view1 for b in batches],
                [b.view2 for b in batches],
                sum(len(b.bad) for b in batches),
            )
        )
    return out


def _same(a, b):
    return all(
        ka == kb and all(map(torch.equal, v1a, v1b)) and all(map(torch.equal, v2a, v2b)) and na == nb
        for (ka, v1a, v2a, na), (kb, v1b, v2b, nb) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("subset", [False, True], ids=["whole-shards", "task-subset"])
def test_cached_stream_reads_each_shard_once_and_yields_the_same_batches(tmp_path, subset):
    shards = make_pool(tmp_path / "pool", [13, 9, 11], bad={(0, 4), (1, 2), (2, 10)})
    keys = None
    if subset:  # a task's share of shared shards: every other sample
        keys = [frozenset(f"{s:05d}{i:04d}" for i in range(0, n, 2)) for s, n in enumerate([13, 9, 11])]
    uncached = _epochs(_stream(shards, 0, 1, keys=keys), range(3))
    cached = _stream(shards, 0, 1, keys=keys, cache_bytes=1 << 20)
    first = _epochs(cached, [0])
    assert set(cached.cache.shards) == {0, 1, 2} and 0 < cached.cache.used <= 1 << 20
    for shard in shards:  # from here on, only memory can serve the epochs
        os.remove(shard)
    assert _same(first + _epochs(cached, [1, 2]), uncached)
    assert sum(epoch[3] for epoch in uncached) > 0  # bad samples are skipped, cached or not


def test_cache_stops_filling_at_its_limit_and_changes_nothing(tmp_path):
    shards = make_pool(tmp_path / "pool", [8, 8, 8])
    uncached = _epochs(_stream(shards, 0, 1), range(2))
    limited = _stream(shards, 0, 1, cache_bytes=3000)  # a shard's JPEGs alone take more
    assert _same(_epochs(limited, range(2)), uncached)
    assert limited.cache.full and limited.cache.used <= 3000 and not limited.cache.shards
    off = _stream(shards, 0, 1)
    list(off.epoch(0))
    assert off.cache.full and off.cache.used == 0 and not off.cache.images


def test_loading_workers_keep_no_cache(tmp_path):
    shards = make_pool(tmp_path / "pool", [8, 8])
    stream = _stream(shards, 0, 1, num_workers=2, cache_bytes=1 << 20)
    assert stream.cache.full  # workers restart every epoch: filling a cache there is wasted reading
    assert _keys(stream.epoch(0)) == _keys(_stream(shards, 0, 1, num_workers=2).epoch(0))


def _run_like_a_trainer(stream, steps, end_epoch_after=None):
    """Batches a trainer consumes over ``steps`` steps (each epoch starts at the step after the
    last; ``end_epoch_after`` = {epoch: batches} ends those epochs early, as when another rank
    ran out), with the epoch state it would checkpoint."""
    state, out = EpochState.fresh(0, 0, stream.logical_workers()), []
    while len(out) < steps:
        batches = stream.epoch(state)
        for batch in batches:
            state.advance(batch)
            out.append(batch)
            if len(out) == steps or state.consumed == (end_epoch_after or {}).get(state.epoch):
                break
        batches.close()
        if len(out) < steps:
            state = EpochState.fresh(state.epoch + 1, state.start_step + state.consumed, state.num_workers)
    return out, state


def _same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys == y.keys
        and (x.epoch, x.step, x.index) == (y.epoch, y.step, y.index)
        and torch.equal(x.view1, y.view1)
        and torch.equal(x.view2, y.view2)
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("end_epoch_after", [None, {0: 1, 2: 2}], ids=["whole-epochs", "epochs-ended-early"])
def test_run_ahead_process_makes_the_same_batches_across_epochs(tmp_path, end_epoch_after):
    shards = make_pool(tmp_path / "pool", [13, 9, 11], bad={(0, 4), (2, 10)})
    here, _ = _run_like_a_trainer(_stream(shards, 0, 1, cache_bytes=1 << 20), 20, end_epoch_after)
    stream = _stream(shards, 0, 1, cache_bytes=1 << 20, run_ahead=3)
    ahead, _ = _run_like_a_trainer(stream, 20, end_epoch_after)
    stream.close()
    assert _same_batches(ahead, here) and len({b.epoch for b in here}) >= 3
    # One process serves every epoch that follows on; an epoch ended early restarts it once.
    assert stream.ahead_starts == (1 if end_epoch_after is None else 3)
    assert sum(len(b.bad) for b in ahead) > 0


def test_run_ahead_resumes_where_the_checkpoint_left_off(tmp_path):
    shards = make_pool(tmp_path / "pool", [14, 10])
    whole, _ = _run_like_a_trainer(_stream(shards, 0, 1), 9)
    first = _stream(shards, 0, 1, run_ahead=2)
    _, state = _run_like_a_trainer(first, 7)  # 5 batches per epoch: stopped inside epoch 1
    first.close()
    resumed = _stream(shards, 0, 1, run_ahead=2)
    rest = list(resumed.epoch(EpochState.from_dict(state.to_dict())))[:2]
    resumed.close()
    assert _same_batches(rest, whole[7:9])


def test_run_ahead_needs_the_one_worker_plan(tmp_path):
    shards = make_pool(tmp_path / "pool", [8])
    with pytest.raises(ValueError, match="num_workers=0"):
        _stream(shards, 0, 1, num_workers=2, run_ahead=2)
