"""merge_topk over index shards equals one monolithic index over the same codes (Flat and IVF-PQ, IP and L2)."""

import faiss
import numpy as np
import pytest

from sept.index.codes import encode_shard, index_from_codes, train_index
from sept.index.merge import merge_topk
from sept.index.spec import METRICS


def _data(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, (np.arange(n) * 13 + 5).astype("int64")


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ4", "IVF8,Flat"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_merge_equals_monolithic(factory, metric):
    x, ids = _data()
    xq = x[:40] + 0.05
    trained = train_index(faiss.index_factory(x.shape[1], factory, METRICS[metric]), x[:2000], seed=1)
    bounds = [(0, 700), (700, 1900), (1900, 3000)]
    shards = [index_from_codes(trained, *encode_shard(trained, x[a:b], ids[a:b])) for a, b in bounds]
    mono = faiss.clone_index(trained)
    if faiss.try_extract_index_ivf(mono) is None:
        mono = faiss.IndexIDMap2(mono)
    mono.add_with_ids(x, ids)
    for index in shards + [mono]:
        if faiss.try_extract_index_ivf(index) is not None:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", 4)
    D, I = mono.search(xq, 10)
    Dm, Im = merge_topk([s.search(xq, 10) for s in shards], 10, metric=metric)
    np.testing.assert_array_equal(Im, I)
    np.testing.assert_allclose(Dm, D, rtol=1e-6, atol=1e-6)
    # best first, in the metric's direction
    assert np.all(np.diff(Dm, axis=1) <= 1e-6) if metric == "ip" else np.all(np.diff(Dm, axis=1) >= -1e-6)


def test_merge_ignores_padding_of_small_shards():
    x, ids = _data(n=50)
    trained = faiss.IndexFlatIP(x.shape[1])
    small = index_from_codes(trained, *encode_shard(trained, x[:3], ids[:3]))  # fewer than k vectors
    big = index_from_codes(trained, *encode_shard(trained, x[3:], ids[3:]))
    D, I = merge_topk([small.search(x[:5], 8), big.search(x[:5], 8)], 8, metric="ip")
    assert (I >= 0).all()
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, Ie = exact.search(x[:5], 8)
    np.testing.assert_array_equal(I, ids[Ie])
