"""choose_factory: Flat when small, the most accurate IVF index that fits the memory budget when large;
lists, quantizer and training sample that grow with the pool."""

import math

import faiss
import pytest

from sept.errors import SeptError
from sept.index.spec import (
    FLAT_MAX_VECTORS,
    HNSW_QUANTIZER_LISTS,
    MAX_LISTS,
    IndexSpec,
    choose_factory,
    factory_lists,
    index_bytes,
    ivf_lists,
    make_index,
    parse_bytes,
    resolve_train_size,
    train_size_for,
)

GIB = 1024**3


def test_small_pools_are_searched_exactly():
    factory, why = choose_factory(50_000, 128, memory_budget=GIB)
    assert factory == "Flat" and "exact" in why


def test_no_budget_takes_pq_of_half_the_dim():
    # nlist = 8*sqrt(1e9) = 252982 -> 2**18, past 2**16 so an HNSW quantizer; PQ of dim/2 bytes
    factory, why = choose_factory(1_000_000_000, 256)
    assert factory == "IVF262144_HNSW32,PQ128"
    assert "262144 lists" in why and "HNSW32 coarse quantizer" in why and "no --memory-budget" in why
    assert f"trained on {64 * 2**18} sampled vectors (64 a list" in why and "16.0 GiB of float32" in why


N_GRID = [int(10 ** (e / 4)) for e in range(20, 41)]  # 1e5 .. 1e10, four steps a decade


def test_lists_grow_with_the_pool_and_reach_hnsw_at_a_billion():
    lists = [ivf_lists(n) for n in N_GRID]
    assert lists == sorted(lists) and len(set(lists)) > 8  # monotone, and really growing
    assert all(nlist & (nlist - 1) == 0 and nlist <= MAX_LISTS for nlist in lists)  # powers of two
    for n, nlist in zip(N_GRID, lists):
        assert 2.8 * math.sqrt(n) <= nlist <= 16 * math.sqrt(n), n  # about 4-16 sqrt(n), rounded
    assert [ivf_lists(int(n)) for n in (1e6, 1e7, 1e8, 1e9)] == [4096, 16384, 65536, 262144]
    assert ivf_lists(10**12) == MAX_LISTS
    factories = [choose_factory(n, 128)[0] for n in N_GRID if n > FLAT_MAX_VECTORS]
    assert [factory_lists(f) for f in factories] == [ivf_lists(n) for n in N_GRID if n > FLAT_MAX_VECTORS]
    for f in factories:  # the quantizer is HNSW exactly past 2**16 lists
        assert ("_HNSW32," in f) == (factory_lists(f) > HNSW_QUANTIZER_LISTS), f
    assert choose_factory(10**8, 128)[0] == "IVF65536,PQ64"
    assert choose_factory(10**9, 128)[0] == "IVF262144_HNSW32,PQ64"


def test_small_pools_keep_flat():
    assert choose_factory(FLAT_MAX_VECTORS, 768)[0] == "Flat"
    assert choose_factory(FLAT_MAX_VECTORS + 1, 768)[0].startswith("IVF")


def test_training_sample_follows_the_lists():
    assert IndexSpec().train_size == 0  # chosen
    sizes = []
    for n in N_GRID:
        if n <= FLAT_MAX_VECTORS:
            continue
        factory, why = choose_factory(n, 128)
        nlist = factory_lists(factory)
        size, train_why = resolve_train_size(factory, n)
        assert size == train_size_for(nlist, n) <= n
        assert size == n or 64 * nlist <= size <= 256 * nlist, (n, nlist, size)
        assert f"trained on {size} sampled vectors" in why and "--train-size sets it" in why
        sizes.append(size)
    assert sizes == sorted(sizes) and sizes[-1] == 64 * MAX_LISTS
    assert train_size_for(16, 1600) == 1600  # bounded by n
    assert train_size_for(16, 10**6) == 256 * 256  # enough for PQ and SQ codebooks
    assert train_size_for(4096, 10**7) == 2**20  # 256 a list
    assert train_size_for(2**18, 10**9) == 64 * 2**18
    assert resolve_train_size("Flat", 500)[0] == 500


def test_explicit_train_size_is_honoured_and_caps_the_lists():
    factory, why = choose_factory(10**9, 128, train_size=1_000_000)
    # 1e6 / 39 = 25641 -> 16384 lists, so a flat quantizer again
    assert factory == "IVF16384,PQ64"
    assert "the rule's 262144 capped" in why and "raise --train-size" in why
    assert "trained on 1000000 sampled vectors (--train-size; 61 a list" in why
    assert resolve_train_size(factory, 10**9, 1_000_000)[0] == 1_000_000
    assert resolve_train_size(factory, 5000, 1_000_000)[0] == 5000  # never more than there are
    # a sample large enough leaves the rule's lists alone
    assert choose_factory(10**9, 128, train_size=20_000_000)[0] == "IVF262144_HNSW32,PQ64"


def test_index_bytes_counts_the_hnsw_graph():
    n, dim, nlist = 10**9, 128, 2**18
    flat_q = index_bytes(f"IVF{nlist},PQ64", n, dim)
    assert index_bytes(f"IVF{nlist}_HNSW32,PQ64", n, dim) - flat_q == nlist * 32 * 2 * 4
    assert flat_q == n * (64 + 8) + nlist * dim * 4 + 256 * dim * 4
    assert factory_lists("OPQ16_128,IVF262144_HNSW32,PQ16") == 262144 and factory_lists("PQ16") == 0


@pytest.mark.parametrize("dim", [16, 24, 32])
def test_every_factory_the_rule_produces_builds(dim):
    seen = set()
    for n in N_GRID + [3 * 10**10]:
        budgets = [None] + [int(n * per) for per in (dim * 4 + 9, dim * 2 + 9, dim + 9, dim / 2 + 9, 4 + 9)]
        for budget in budgets:
            for train_size in (None, 1_000_000):
                try:
                    factory, _ = choose_factory(n, dim, budget, train_size=train_size)
                except SeptError:
                    continue
                if budget is not None:
                    assert index_bytes(factory, n, dim) <= budget
                seen.add(factory)
    assert any("_HNSW32" in f for f in seen) and any(f.startswith("OPQ") for f in seen)
    for factory in sorted(seen):
        index = make_index(factory, dim, faiss.METRIC_INNER_PRODUCT)
        assert faiss.try_extract_index_ivf(index) is None or faiss.extract_index_ivf(index).nlist == factory_lists(
            factory
        )


@pytest.mark.parametrize(
    "budget, expected",
    [
        ("16G", "IVF2048,Flat"),  # 10M x (512 + 8) B = 4.8 GiB fits
        ("3G", "IVF2048,SQfp16"),  # 10M x (256 + 8) B = 2.5 GiB
        ("1.5G", "IVF2048,SQ8"),  # 10M x (128 + 8) B = 1.3 GiB
        ("1G", "IVF2048,PQ64"),  # 10M x (64 + 8) B = 0.67 GiB
        ("400M", "OPQ32_128,IVF2048,PQ32"),  # 4 dims per sub-quantizer: OPQ pays
        ("160M", "OPQ8_128,IVF2048,PQ8"),  # 10M x (8 + 8) B = 153 MiB
    ],
)
def test_budget_picks_the_most_accurate_index_that_fits(budget, expected):
    n, dim = 10_000_000, 128
    factory, why = choose_factory(n, dim, parse_bytes(budget), train_size=100_000)
    assert factory == expected, why
    assert index_bytes(factory, n, dim) <= parse_bytes(budget)
    assert "2048 lists" in why and "--train-size" in why  # 4*sqrt(n) capped by the training sample
    make_index(factory, dim, faiss.METRIC_INNER_PRODUCT)  # faiss accepts what it picks


def test_budget_too_small_for_any_index_is_an_error():
    with pytest.raises(SeptError, match=r"too small for any index of 10000000 vectors"):
        choose_factory(10_000_000, 128, parse_bytes("50M"), train_size=100_000)


def test_bad_factory_and_sizes():
    with pytest.raises(SeptError, match="faiss rejects factory string 'IVFx,PQ3'"):
        make_index("IVFx,PQ3", 16, faiss.METRIC_L2)
    assert parse_bytes("512MiB") == 512 * 1024**2 and parse_bytes("1000") == 1000
    with pytest.raises(SeptError, match="memory size"):
        parse_bytes("lots")
