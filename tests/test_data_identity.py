"""Sample ids pack (shard index, position) into one int64 and unpack it again."""

import numpy as np
import pytest

from sept.data.identity import MAX_POSITION, MAX_SHARD_INDEX, SHARD_BITS, make_ids, split_ids


def test_ids_round_trip_at_the_edges_and_at_random():
    rng = np.random.default_rng(0)
    for shard in (0, 1, 7, 123_456, MAX_SHARD_INDEX):
        positions = np.concatenate([[0, 1, MAX_POSITION], rng.integers(0, MAX_POSITION, 100)])
        ids = make_ids(shard, positions)
        assert ids.dtype == np.int64
        assert (ids >= 0).all()
        shards, back = split_ids(ids)
        assert (shards == shard).all()
        np.testing.assert_array_equal(back, positions)


def test_ids_sort_by_shard_then_position_and_are_unique():
    pairs = [(s, p) for s in (0, 1, 2) for p in (0, 5, MAX_POSITION)]
    ids = np.concatenate([make_ids(s, [p]) for s, p in pairs])
    assert len(set(ids.tolist())) == len(pairs)
    assert list(np.argsort(ids, kind="stable")) == list(range(len(pairs)))
    assert make_ids(3, [5])[0] == (3 << SHARD_BITS) + 5


def test_make_ids_accepts_lists_and_empty_input():
    np.testing.assert_array_equal(make_ids(2, [0, 4]), make_ids(2, np.array([0, 4], dtype=np.uint32)))
    assert make_ids(2, []).shape == (0,)
    shards, positions = split_ids(np.zeros(0, dtype=np.int64))
    assert shards.shape == positions.shape == (0,)


@pytest.mark.parametrize(
    "shard, positions",
    [(-1, [0]), (MAX_SHARD_INDEX + 1, [0]), (0, [-1]), (0, [MAX_POSITION + 1]), (0, [0.5])],
)
def test_make_ids_rejects_values_that_do_not_fit(shard, positions):
    with pytest.raises(ValueError):
        make_ids(shard, positions)


def test_split_ids_rejects_negative_ids():
    with pytest.raises(ValueError):
        split_ids([-1])
