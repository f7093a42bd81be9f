"""choose_factory: Flat when small, the most accurate IVF index that fits the memory budget when large."""

import faiss
import pytest

from sept.errors import SeptError
from sept.index.spec import choose_factory, index_bytes, make_index, parse_bytes

GIB = 1024**3


def test_small_pools_are_searched_exactly():
    factory, why = choose_factory(50_000, 128, memory_budget=GIB)
    assert factory == "Flat" and "exact" in why


def test_no_budget_keeps_the_legacy_rule():
    # nlist = 2**(bit_length(4*sqrt(1e9)) - 1) = 2**16, PQ of dim/2 bytes
    assert choose_factory(1_000_000_000, 256)[0] == "IVF65536,PQ128"


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
