"""IndexSpec: which FAISS index sept builds, and the rule that picks one when the user does not.

The rule (``choose_factory``) works like autofaiss: exact search (Flat) for small pools; beyond
that, IVF with about 4*sqrt(n) lists (no more than the training sample can fit, 39 vectors a
list), and the largest codes whose index fits ``--memory-budget``: IVF,Flat, then scalar
quantizers, then PQ codes of fewer and fewer bytes, with an OPQ rotation once each PQ
sub-quantizer covers 4 or more dimensions (there balancing variance across them pays off).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import faiss

from sept.errors import SeptError

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}

FLAT_MAX_VECTORS = 200_000
"""Up to here exact search is cheap enough per query, and needs no training."""
MIN_POINTS_PER_LIST = 39
"""faiss k-means wants at least this many training vectors per centroid."""
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
    train_size: int = field(default=100_000, metadata={"help": "vectors sampled to train the coarse quantizer and PQ"})
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
    codes and 8-byte ids (IVF) plus the trained parts (centroids, PQ codebooks, OPQ matrix)."""
    code, trained, ivf = dim * 4, 0, False
    for part in factory.split(","):
        if part.startswith("OPQ"):
            trained += dim * dim * 4
        elif part.startswith("IVF"):
            ivf = True
            trained += int(re.match(r"IVF(\d+)", part).group(1)) * dim * 4
        elif part.startswith("PQ"):
            code = int(re.match(r"PQ(\d+)", part).group(1))
            trained += 256 * dim * 4
        elif part == "SQfp16":
            code = dim * 2
        elif part == "SQ8":
            code, trained = dim, trained + 2 * dim * 4
    return n * (code + ID_BYTES) + trained if ivf else n * (code + ID_BYTES)


def _nlist(n: int, train_size: int | None) -> tuple[int, str]:
    nlist = 1 << max(4, int(round(4 * n**0.5)).bit_length() - 1)
    why = f"IVF with {nlist} lists (~4*sqrt(n))"
    if train_size is not None:
        fit = min(n, train_size) // MIN_POINTS_PER_LIST
        if fit < nlist:
            nlist = 1 << max(0, fit.bit_length() - 1)
            why = (
                f"IVF with {nlist} lists (4*sqrt(n) capped so that each list gets {MIN_POINTS_PER_LIST}+ of the "
                f"{min(n, train_size)} training vectors; raise --train-size for more)"
            )
    return nlist, why


def _candidates(dim: int, nlist: int) -> list[tuple[str, str]]:
    """Factory strings from the most to the least accurate, with what their codes are."""
    out = [
        (f"IVF{nlist},Flat", "uncompressed float32 vectors"),
        (f"IVF{nlist},SQfp16", f"float16 scalar quantizer, {2 * dim} bytes a vector"),
        (f"IVF{nlist},SQ8", f"8-bit scalar quantizer, {dim} bytes a vector"),
    ]
    m = dim // 2
    while m >= MIN_PQ_BYTES:
        if dim % m == 0:
            if dim // m >= 4:
                out.append(
                    (
                        f"OPQ{m}_{dim},IVF{nlist},PQ{m}",
                        f"PQ codes of {m} bytes, each over {dim // m} dims, so an OPQ rotation pays",
                    )
                )
            else:
                out.append((f"IVF{nlist},PQ{m}", f"PQ codes of {m} bytes, each over {dim // m} dims"))
        m //= 2
    return out


def choose_factory(
    n: int, dim: int, memory_budget: int | None = None, train_size: int | None = None
) -> tuple[str, str]:
    """Pick a factory string for n vectors of dimension dim, and say why.

    Without a memory budget: Flat up to FLAT_MAX_VECTORS, else IVF (~4*sqrt(n) lists) with PQ
    codes of dim/2 bytes. With one: the most accurate index whose estimated memory
    (``index_bytes``) fits; SeptError when not even the smallest fits. ``train_size`` caps the
    number of IVF lists at what the training sample can fit.
    """
    flat = n * dim * 4
    budget_text = "" if memory_budget is None else f" within --memory-budget {format_bytes(memory_budget)}"
    if n <= FLAT_MAX_VECTORS and (memory_budget is None or flat <= memory_budget):
        return "Flat", f"{n} vectors: exact search (Flat, {format_bytes(flat)}) is cheap at this size{budget_text}"
    nlist, list_why = _nlist(n, train_size)
    if memory_budget is None:
        m = max(1, dim // 2)
        while dim % m:
            m -= 1
        return f"IVF{nlist},PQ{m}", f"{n} vectors: {list_why} and PQ{m} codes (no --memory-budget given)"
    tried = []
    for factory, codes in _candidates(dim, nlist):
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
