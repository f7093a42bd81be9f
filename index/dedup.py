"""Near-duplicate collapsing and the leakage guard: cosine-similarity rules on embeddings. Numpy and faiss only.

Both compare L2-normalised vectors, so their thresholds are cosine similarities whatever the
index's metric. The near-duplicate rule is greedy in priority order: a candidate is dropped when
it is at least ``threshold`` similar to one already accepted, and the most similar of those
stands for both. ``CandidateNearDuplicates`` applies it when the candidates are known up front
(the search strategies): one faiss range search among the candidates finds every close pair, so
each check looks at a candidate's own close pairs only, O(budget x pairs) rather than
O(budget^2). ``NearDuplicateFilter`` applies it to candidates met one at a time (the cluster
strategy's pool scan), searching everything accepted so far.
``leaked_ids`` turns the nearest pool neighbours of the target's held-out images into the set
of pool samples that must never be selected.
"""

from __future__ import annotations

import faiss
import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def to_similarity(D: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
    """Search distances as similarities, higher is better; padding (id -1) becomes -inf.

    Inner product is taken as is (cosine for normalised vectors); a squared L2 distance d
    between unit vectors is 2 - 2cos, so it maps to cos = 1 - d / 2.
    """
    D = np.asarray(D, dtype=np.float32)
    S = D.copy() if metric == "ip" else (1.0 - D / 2.0).astype(np.float32)
    S[np.asarray(I) < 0] = -np.inf
    return S


class NearDuplicateFilter:
    """Accepts pool samples one at a time, refusing any that nearly duplicates one accepted before.

    ``vectors`` maps every candidate id to its embedding. Exact: each check searches all accepted
    vectors (cost grows with budget x accepted x dim; the option is off unless asked for).
    """

    def __init__(self, vectors: dict[int, np.ndarray], threshold: float, *, dim: int | None = None):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.threshold = float(threshold)
        self.vectors = vectors
        if dim is None:
            dim = len(next(iter(vectors.values()))) if vectors else 1
        self.index = faiss.IndexFlatIP(dim)
        self.accepted: list[int] = []
        self.duplicates: dict[int, int] = {}  # dropped id -> the accepted id it duplicates

    def _vector(self, pid: int) -> np.ndarray:
        return normalize(np.asarray(self.vectors[pid])[None, :])

    def duplicate_of(self, pid: int) -> int | None:
        if not self.accepted:
            return None
        D, I = self.index.search(self._vector(pid), 1)
        if D[0, 0] >= self.threshold:
            kept = self.accepted[int(I[0, 0])]
            self.duplicates[pid] = kept
            return kept
        return None

    def accept(self, pid: int) -> None:
        self.index.add(self._vector(pid))
        self.accepted.append(pid)


EXACT_PAIRS_MAX = 50_000
"""Up to this many candidates the close pairs come from an exact (flat) range search; beyond, from
an IVF over the candidates probing ``PAIR_NPROBE`` lists, which may miss a pair split across lists."""
PAIR_NPROBE = 16


def close_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows of x (normalised here) at least ``threshold`` similar, as CSR: row i's
    partners are ``partners[lims[i]:lims[i + 1]]`` with similarities ``sims[...]`` (itself excluded)."""
    x = normalize(x)
    n, d = x.shape
    if n <= EXACT_PAIRS_MAX:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(n, min(n, 64 * nlist), replace=False)])
        index.nprobe = PAIR_NPROBE
    index.add(x)
    lims, sims, partners = index.range_search(x, float(threshold))
    row = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))  # faiss gives size_t limits
    keep = partners != row
    counts = np.bincount(row[keep], minlength=n)
    lims = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=lims[1:])
    return lims, partners[keep].astype(np.int64), sims[keep].astype(np.float32)


class CandidateNearDuplicates:
    """The near-duplicate rule over candidates known up front: ``ids`` (any order) and their vectors.

    Same interface and answers as ``NearDuplicateFilter`` (for a flat range search, exactly; see
    ``EXACT_PAIRS_MAX``), with a check that costs a candidate's close pairs, not the accepted set.
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, threshold: float):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold is a cosine similarity in [-1, 1], got {threshold}")
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
        self.ids = np.asarray(ids, np.int64)[order]
        self.threshold = float(threshold)
        if len(self.ids):
            self.lims, self.partners, self.sims = close_pairs(np.asarray(vectors)[order], threshold)
        else:
            self.lims, self.partners, self.sims = np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        self.is_accepted = np.zeros(len(self.ids), bool)
        self.duplicates: dict[int, int] = {}  # dropped id -> the accepted id it duplicates

    def _row(self, pid: int) -> int:
        row = int(np.searchsorted(self.ids, pid))
        if row >= len(self.ids) or self.ids[row] != pid:
            raise KeyError(f"pool id {pid} is not among the near-duplicate filter's candidates")
        return row

    def duplicate_of(self, pid: int) -> int | None:
        row = self._row(pid)
        a, b = self.lims[row], self.lims[row + 1]
        if a == b:
            return None
        partners, sims = self.partners[a:b], self.sims[a:b]
        accepted = self.is_accepted[partners]
        if not accepted.any():
            return None
        best = np.flatnonzero(accepted)[np.argmax(sims[accepted])]
        kept = int(self.ids[partners[best]])
        self.duplicates[pid] = kept
        return kept

    def accept(self, pid: int) -> None:
        self.is_accepted[self._row(pid)] = True


def leaked_ids(S: np.ndarray, I: np.ndarray, threshold: float) -> tuple[dict[int, tuple[int, float]], bool]:
    """Pool ids at least ``threshold`` similar to some held-out image, from each image's top-k.

    S, I: (n_heldout, k) similarities and ids, best first. Returns {pool id: (held-out row, similarity)}
    with the most similar held-out image of each, and whether the answer may be incomplete: some
    image's k-th neighbour is still above the threshold, so more may lie beyond k (search again
    with a larger k).
    """
    if S.size == 0:
        return {}, False
    close = (S >= threshold) & (I >= 0)
    leaked: dict[int, tuple[int, float]] = {}
    for h, r in zip(*np.nonzero(close)):
        pid, sim = int(I[h, r]), float(S[h, r])
        if pid not in leaked or sim > leaked[pid][1]:
            leaked[pid] = (int(h), sim)
    incomplete = bool(np.any(close[:, -1]))
    return leaked, incomplete
