"""IndexSpec: which FAISS index sept builds, and the rule that picks one when the user does not.

The rule (``choose_factory``) works like autofaiss: exact search (Flat) for small pools; beyond
that, IVF with lists that grow with the pool (``ivf_lists``: about 4*sqrt(n) at 1M vectors and
8*sqrt(n) at 1B, a power of two, at most 2^20; IVF4096 at 1M, IVF262144 at 1B), an HNSW coarse
quantizer past 2^16 lists (a flat one would compare every query and every added vector with
every centroid), and the largest codes whose index fits ``--memory-budget``: IVF,Flat, then
scalar quantizers, then PQ codes of fewer and fewer bytes, with an OPQ rotation once each PQ
sub-quantizer covers 4 or more dimensions (there balancing variance across them pays off).

The training sample follows the lists (``train_size_for``): 64 to 256 vectors a list, bounded
by n. An explicit ``--train-size`` is honoured, and caps the lists at what it can train (39 a
list).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import faiss

from sept.errors import SeptError

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}

FLAT_MAX_VECTORS = 200_000
"""Up to here exact search is cheap enough per query, and needs no training."""
MIN_POINTS_PER_LIST = 39
"""faiss k-means wants at least this many training vectors per centroid."""
TRAIN_POINTS_PER_LIST = (64, 256)
"""The chosen training sample: this many vectors a list (faiss k-means subsamples past 256)..."""
TRAIN_TARGET = 1 << 20
"""...as close to this many vectors as those bounds allow."""
MIN_TRAIN_SIZE = 256 * 256
"""At least this many, for PQ and SQ codebooks (256 centroids, up to 256 points each)."""
HNSW_QUANTIZER_LISTS = 1 << 16
"""Past this many lists the coarse quantizer is an HNSW graph over the centroids, not a flat scan."""
HNSW_M = 32
MAX_LISTS = 1 << 20
ID_BYTES = 8
MIN_PQ_BYTES = 4


@dataclass
class IndexSpec:
    """Everything that decides the index's content. Saved in the index store's attributes."""

    factory: str = field(  # "" means: choose from the data (see choose_factory)
        default="",
        metadata={
            "help": "FAISS factory string, e.g. Flat or IVF1024,PQ32 "
            "(default: chosen from the pool size, the dimension and --memory-budget)"
        },
    )
    metric: str = field(  # embeddings are L2-normalised, so inner product is cosine similarity
        default="ip", metadata={"choices": tuple(METRICS), "help": "ip: inner product (cosine); l2: L2 distance"}
    )
    shards: int = field(default=2, metadata={"help": "index shards"})
    train_size: int = field(  # 0 means: chosen from the number of lists (see train_size_for)
        default=0,
        metadata={
            "help": "vectors sampled to train the coarse quantizer and PQ; also caps the IVF lists at "
            f"train-size/{MIN_POINTS_PER_LIST} (default: chosen from the lists, "
            f"{TRAIN_POINTS_PER_LIST[0]} to {TRAIN_POINTS_PER_LIST[1]} a list)"
        },
    )
    nprobe: int = field(default=16, metadata={"help": "IVF lists probed per query (until `index eval` chooses)"})
    seed: int = 0

    def faiss_metric(self) -> int:
        if self.metric not in METRICS:
            raise SeptError(f"unknown metric {self.metric!r}; use one of {sorted(METRICS)}")
        return METRICS[self.metric]

    def to_dict(self) -> dict:
        return asdict(self)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | None) -> int | None:
    """'16G', '512MiB', '1.5g', '1000000' -> bytes (powers of 1024 for K, M, G, T); None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise SeptError(f"cannot read memory size {text!r}; write it like 16G, 512M or 1073741824")
    value, unit = float(match.group(1)), match.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def index_bytes(factory: str, n: int, dim: int) -> int:
    """Estimated memory of an index of n vectors built from one of choose_factory's factory strings:
    codes and 8-byte ids (IVF) plus the trained parts (centroids, an HNSW quantizer's graph, PQ
    codebooks, OPQ matrix)."""
    code, trained, ivf = dim * 4, 0, False
    for part in factory.split(","):
        if part.startswith("OPQ"):
            trained += dim * dim * 4
        elif part.startswith("IVF"):
            ivf = True
            nlist = int(re.match(r"IVF(\d+)", part).group(1))
            trained += nlist * dim * 4
            hnsw = re.search(r"_HNSW(\d+)", part)
            if hnsw:  # level-0 links (2*M int32 a node) dominate the graph
                trained += nlist * int(hnsw.group(1)) * 2 * 4
        elif part.startswith("PQ"):
            code = int(re.match(r"PQ(\d+)", part).group(1))
            trained += 256 * dim * 4
        elif part == "SQfp16":
            code = dim * 2
        elif part == "SQ8":
            code, trained = dim, trained + 2 * dim * 4
    return n * (code + ID_BYTES) + trained if ivf else n * (code + ID_BYTES)


def factory_lists(factory: str) -> int:
    """The number of IVF lists a factory string asks for; 0 when it is not an IVF index."""
    match = re.search(r"(?:^|,)(?:[^,]*_)?IVF(\d+)", factory)
    return int(match.group(1)) if match else 0


def ivf_lists(n: int) -> int:
    """Lists for n vectors: c*sqrt(n) rounded to a power of two, c = 4 up to 1M vectors and
    doubling with every 1000x more (8 at 1B: lists grow a little faster than sqrt(n), which keeps
    the lists' length, and so the vectors scanned per probe, from growing as fast as the pool),
    between 16 and MAX_LISTS."""
    c = 4 * 2 ** (max(0.0, math.log10(max(n, 1) / 1e6)) / 3)
    return min(MAX_LISTS, 1 << max(4, round(math.log2(max(1.0, c * math.sqrt(n))))))


def train_size_for(nlist: int, n: int) -> int:
    """The training sample chosen for nlist lists: 64 to 256 vectors a list, as close to
    TRAIN_TARGET as that allows, at least MIN_TRAIN_SIZE, never more than the n vectors there are."""
    lo, hi = TRAIN_POINTS_PER_LIST
    return min(n, max(MIN_TRAIN_SIZE, min(max(TRAIN_TARGET, lo * nlist), hi * nlist)))


def resolve_train_size(factory: str, n: int, train_size: int | None = None, dim: int = 0) -> tuple[int, str]:
    """How many vectors sept index samples to train ``factory`` on n vectors, and why: the given
    train_size (bounded by n), else train_size_for the factory's lists. With dim, the reason
    says the sample's memory too."""
    nlist = factory_lists(factory)
    if train_size:
        size = min(n, train_size)
        notes = ["--train-size"] + ([f"{size / nlist:.0f} a list"] if nlist else [])
    else:
        size = train_size_for(nlist, n)
        lo, hi = TRAIN_POINTS_PER_LIST
        notes = [f"{size / nlist:.0f} a list: {lo}-{hi} a list, bounded by n"] if nlist else []
        notes.append("--train-size sets it")
    if dim:
        notes.append(f"{format_bytes(size * dim * 4)} of float32")
    return size, f"trained on {size} sampled vectors ({'; '.join(notes)})"


def _nlist(n: int, train_size: int | None) -> tuple[int, str]:
    nlist = ivf_lists(n)
    c = nlist / math.sqrt(n)
    why = (
        f"IVF with {nlist} lists ({c:.1f}*sqrt(n): c*sqrt(n) as a power of two, c = 4 at 1M vectors "
        f"and doubling with every 1000x more, so 8 at 1B; at most {MAX_LISTS})"
    )
    if train_size:
        fit = min(n, train_size) // MIN_POINTS_PER_LIST
        if fit < nlist:
            nlist = 1 << max(0, fit.bit_length() - 1)
            why = (
                f"IVF with {nlist} lists (the rule's {ivf_lists(n)} capped so that each list gets "
                f"{MIN_POINTS_PER_LIST}+ of the {min(n, train_size)} training vectors; raise --train-size for more)"
            )
    return nlist, why


def ivf_part(nlist: int) -> tuple[str, str]:
    """The IVF part of a factory string for nlist lists, and what its coarse quantizer is."""
    if nlist > HNSW_QUANTIZER_LISTS:
        return f"IVF{nlist}_HNSW{HNSW_M}", (
            f"an HNSW{HNSW_M} coarse quantizer (past {HNSW_QUANTIZER_LISTS} lists a flat one would compare "
            "every query and every added vector with every centroid)"
        )
    return f"IVF{nlist}", "a flat coarse quantizer"


def _candidates(dim: int, ivf: str) -> list[tuple[str, str]]:
    """Factory strings from the most to the least accurate, with what their codes are."""
    out = [
        (f"{ivf},Flat", "uncompressed float32 vectors"),
        (f"{ivf},SQfp16", f"float16 scalar quantizer, {2 * dim} bytes a vector"),
        (f"{ivf},SQ8", f"8-bit scalar quantizer, {dim} bytes a vector"),
    ]
    m = dim // 2
    while m >= MIN_PQ_BYTES:
        if dim % m == 0:
            if dim // m >= 4:
                out.append(
                    (
                        f"OPQ{m}_{dim},{ivf},PQ{m}",
                        f"PQ codes of {m} bytes, each over {dim // m} dims, so an OPQ rotation pays",
                    )
                )
            else:
                out.append((f"{ivf},PQ{m}", f"PQ codes of {m} bytes, each over {dim // m} dims"))
        m //= 2
    return out


def choose_factory(
    n: int, dim: int, memory_budget: int | None = None, train_size: int | None = None
) -> tuple[str, str]:
    """Pick a factory string for n vectors of dimension dim, and say why.

    Without a memory budget: Flat up to FLAT_MAX_VECTORS, else IVF (``ivf_lists`` lists, an HNSW
    quantizer past HNSW_QUANTIZER_LISTS) with PQ codes of dim/2 bytes. With one: the most
    accurate index whose estimated memory (``index_bytes``) fits; SeptError when not even the
    smallest fits. A given ``train_size`` (0 or None: chosen, ``train_size_for``) caps the number
    of IVF lists at what it can train. The reason names the lists, the quantizer, the training
    sample and the memory.
    """
    flat = n * dim * 4
    budget_text = "" if memory_budget is None else f" within --memory-budget {format_bytes(memory_budget)}"
    if n <= FLAT_MAX_VECTORS and (memory_budget is None or flat <= memory_budget):
        return "Flat", f"{n} vectors: exact search (Flat, {format_bytes(flat)}) is cheap at this size{budget_text}"
    nlist, list_why = _nlist(n, train_size)
    ivf, quantizer_why = ivf_part(nlist)
    list_why = f"{list_why}, {quantizer_why}; {resolve_train_size(ivf, n, train_size, dim)[1]}"
    if memory_budget is None:
        m = max(1, dim // 2)
        while dim % m:
            m -= 1
        factory = f"{ivf},PQ{m}"
        return factory, (
            f"{n} vectors of dim {dim}: {list_why}; PQ{m} codes: about "
            f"{format_bytes(index_bytes(factory, n, dim))} (no --memory-budget given)"
        )
    tried = []
    for factory, codes in _candidates(dim, ivf):
        need = index_bytes(factory, n, dim)
        if need <= memory_budget:
            better = f"; {tried[-1]} would not fit" if tried else ""
            return factory, (
                f"{n} vectors of dim {dim}: {list_why}; {codes}: about {format_bytes(need)}{budget_text}{better}"
            )
        tried.append(f"{factory} ({format_bytes(need)})")
    raise SeptError(
        f"--memory-budget {format_bytes(memory_budget)} is too small for any index of {n} vectors of dim {dim}: "
        f"the smallest, {tried[-1]}, does not fit"
    )


def make_index(factory: str, dim: int, metric: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, metric)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise SeptError(f"faiss rejects factory string {factory!r} for dim {dim}: {first}") from None
