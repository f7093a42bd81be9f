"""The exact merge: sharded top-k == one monolithic index over the same codes; ties broken by id;
the result independent of how shards are grouped or in which order their answers arrive; and the
memory-bounded wave plan."""

import faiss
import numpy as np
import pytest

from sept.errors import SeptError
from sept.index.codes import encode_shard, index_from_codes, train_index
from sept.index.merge import TopK, canonical_order, merge_topk
from sept.index.search_plan import ShardFootprint, group_peak, plan_waves
from sept.index.spec import METRICS, parse_bytes

faiss.omp_set_num_threads(1)  # two shared cores: threads only thrash


def _data(n=4000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(n * 5)[:n].astype("int64")  # ids unrelated to storage order
    return x, ids


def _concat_codes(parts):
    """One monolithic CSR (offsets, ids, codes) from shard CSRs: list l holds every shard's list l."""
    nlist = len(parts[0][0]) - 1
    ids, codes, sizes = [], [], []
    for lst in range(nlist):
        for offsets, pid, pcodes in parts:
            a, b = offsets[lst], offsets[lst + 1]
            ids.append(pid[a:b])
            codes.append(pcodes[a:b])
        sizes.append(sum(p[0][lst + 1] - p[0][lst] for p in parts))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return offsets, np.concatenate(ids), np.concatenate(codes)


FACTORIES = ["Flat", "IVF16,PQ4np", "IVF32,PQ8x4np", "IVF8,Flat"]  # np: skip slow polysemous training


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merged_shards_equal_monolithic_index_over_same_codes(factory, metric):
    x, ids = _data()
    xq = _data(n=64, seed=1)[0]
    trained = train_index(faiss.index_factory(x.shape[1], factory, METRICS[metric]), x[:3000], seed=1)
    bounds = [(0, 500), (500, 1900), (1900, 2000), (2000, 4000)]
    parts = [encode_shard(trained, x[a:b], ids[a:b]) for a, b in bounds]
    shards = [index_from_codes(trained, *p) for p in parts]
    mono = index_from_codes(trained, *_concat_codes(parts))
    assert mono.ntotal == len(x)
    for index in shards + [mono]:
        if faiss.try_extract_index_ivf(index) is not None:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", 5)
    k = 25
    D, I = mono.search(xq, k)
    assert not _has_ties_at_cut(mono.search(xq, k + 1)[0], k), "test data must have a well-defined top-k"
    D, I = canonical_order(D, I, metric=metric)  # faiss orders equal distances arbitrarily
    Dm, Im = merge_topk([s.search(xq, k) for s in shards], k, metric=metric)
    np.testing.assert_array_equal(Im, I)
    np.testing.assert_array_equal(Dm, D)  # the same codes give the same float distances
    step = np.diff(Dm, axis=1)
    assert (step <= 0).all() if metric == "ip" else (step >= 0).all(), "best first, in the metric's direction"
    # and a running merge, fed shard by shard in any order, gives the same bytes
    for order in ([3, 1, 0, 2], [2, 0, 3, 1]):
        top = TopK(len(xq), k, metric=metric)
        for j in order:
            top.add(*shards[j].search(xq, k))
        np.testing.assert_array_equal(top.I, Im)
        np.testing.assert_array_equal(top.D, Dm)


def _has_ties_at_cut(D, k):
    return bool(np.any(D[:, k - 1] == D[:, k]))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_wrong_direction_would_be_caught(metric):
    """The merge keeps the best of each metric; the worst of the other direction differs."""
    x, ids = _data(n=300)
    flat = faiss.index_factory(16, "Flat", METRICS[metric])
    a = index_from_codes(flat, *encode_shard(flat, x[:150], ids[:150]))
    b = index_from_codes(flat, *encode_shard(flat, x[150:], ids[150:]))
    xq = x[:5]
    D, I = merge_topk([a.search(xq, 3), b.search(xq, 3)], 3, metric=metric)
    assert (I[:, 0] == ids[:5]).all(), "each query's own vector is its nearest neighbour"
    wrong = "l2" if metric == "ip" else "ip"
    _, I_wrong = merge_topk([a.search(xq, 3), b.search(xq, 3)], 3, metric=wrong)
    assert not (I_wrong[:, 0] == ids[:5]).all()


def test_ties_broken_by_id_whatever_the_sharding():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 8)).astype("float32")
    x = np.concatenate([base] * 5)  # every vector five times: every distance is a 5-way tie
    ids = rng.permutation(len(x)).astype("int64") * 3
    flat = faiss.IndexFlatIP(8)
    xq = base[:12]
    results = []
    for cuts in ([0, 200], [0, 70, 130, 200], [0, 10, 11, 150, 200]):
        shards = [index_from_codes(flat, *encode_shard(flat, x[a:b], ids[a:b])) for a, b in zip(cuts, cuts[1:])]
        # each shard is asked for enough neighbours to hold every tie group whole
        results.append(merge_topk([s.search(xq, 20) for s in shards], 10, metric="ip"))
    for D, I in results[1:]:
        np.testing.assert_array_equal(I, results[0][1])
        np.testing.assert_array_equal(D, results[0][0])
    D, I = results[0]
    for row_d, row_i in zip(D, I):
        for score in np.unique(row_d):
            tied = row_i[row_d == score]
            assert (np.diff(tied) > 0).all(), "equal scores are ordered by id"
    # the reference: brute force over all vectors, sorted by (score desc, id asc); scored once per
    # distinct vector, since BLAS may round copies of one vector differently (seen on AVX-512)
    scores = np.tile(xq @ base.T, 5)
    for q in range(len(xq)):
        order = np.lexsort((ids, -scores[q]))[:10]
        np.testing.assert_array_equal(I[q], ids[order])


def test_padding_of_small_shards_never_wins_and_short_results_pad():
    x, ids = _data(n=50)
    flat = faiss.IndexFlatL2(16)
    small = index_from_codes(flat, *encode_shard(flat, x[:3], ids[:3]))
    big = index_from_codes(flat, *encode_shard(flat, x[3:10], ids[3:10]))
    D, I = merge_topk([small.search(x[:4], 8), big.search(x[:4], 8)], 12, metric="l2")
    assert (I[:, :10] >= 0).all() and (I[:, 10:] == -1).all()
    assert np.isinf(D[:, 10:]).all() and (D[:, 10:] > 0).all()
    assert set(I[0, :10]) == set(ids[:10])


def test_parse_bytes_reads_the_units_users_write():
    assert parse_bytes("2GB") == 2 << 30
    assert parse_bytes("512m") == 512 << 20
    assert parse_bytes("1000") == 1000
    assert parse_bytes(None) is None
    with pytest.raises(SeptError, match="12 parsecs"):
        parse_bytes("12 parsecs")


def test_plan_fits_memory_in_waves_and_covers_every_shard_once():
    fps = [ShardFootprint(resident=r, loading=r // 2) for r in (100, 300, 200, 250, 50, 120)]
    one = plan_waves(fps, searchers=3)
    assert len(one.waves) == 1 and len(one.waves[0]) == 3
    tight = plan_waves(fps, searchers=2, memory_per_searcher=480, base=10)
    assert len(tight.waves) >= 2
    seen = sorted(j for wave in tight.waves for group in wave for j in group)
    assert seen == list(range(len(fps)))
    for wave in tight.waves:
        assert len(wave) <= 2
        for group in wave:
            assert group_peak(group, fps, 10) <= 480
    with pytest.raises(SeptError, match="index shard 1"):
        plan_waves(fps, searchers=2, memory_per_searcher=200)
