"""IndexSpec: which FAISS index sept builds, and the rule that picks one when the user does not."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import faiss

from sept.errors import SeptError

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass
class IndexSpec:
    """Everything that decides the index's content. Saved in the index store's attributes."""

    factory: str = ""  # any FAISS factory string; "" means: choose from the data (see choose_factory)
    metric: str = "ip"  # embeddings are L2-normalised, so inner product is cosine similarity
    shards: int = 2
    train_size: int = 100_000  # vectors sampled to train the coarse quantizer and PQ
    nprobe: int = 16
    seed: int = 0

    def faiss_metric(self) -> int:
        if self.metric not in METRICS:
            raise SeptError(f"unknown metric {self.metric!r}; use one of {sorted(METRICS)}")
        return METRICS[self.metric]

    def to_dict(self) -> dict:
        return asdict(self)


def choose_factory(n: int, dim: int) -> tuple[str, str]:
    """Pick a factory string for n vectors of dimension dim, and say why.

    Exact search is affordable up to ~1M vectors; beyond, IVF with about 4*sqrt(n) lists and
    PQ codes of dim/2 bytes keeps memory near 1/8 of float32 while recall stays high.
    """
    if n <= 200_000:
        return "Flat", f"{n} vectors: exact search (Flat) is cheap at this size"
    nlist = 1 << max(4, int(round(4 * n**0.5)).bit_length() - 1)
    m = max(1, dim // 2)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}", f"{n} vectors: IVF with {nlist} lists (~4*sqrt(n)) and PQ{m} codes"


def make_index(factory: str, dim: int, metric: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, metric)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise SeptError(f"faiss rejects factory string {factory!r} for dim {dim}: {first}") from None
