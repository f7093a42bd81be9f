"""Near-duplicate collapsing and the leakage guard: cosine-similarity rules on embeddings. Numpy and faiss only.

Both compare L2-normalised vectors, so their thresholds are cosine similarities whatever the
index's metric. ``NearDuplicateFilter`` is greedy in priority order: a candidate is dropped when
it is at least ``threshold`` similar to one already accepted, and that one stands for both.
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
