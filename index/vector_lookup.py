"""Pool embeddings by global id, read from the embedding store only for the pool shards that hold them.

The near-duplicate rule needs the vectors of the candidates it compares: ``fetch_vector_array``
when the candidates are known up front (the search strategies' neighbour lists), ``LazyVectors``
when they are met one at a time (the cluster strategy's pool scan).
"""

from __future__ import annotations

import numpy as np

from sept.data.identity import split_ids


def fetch_vector_array(emb, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids found, their embeddings as one array), sorted by id, reading only the pool shards that hold them."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    shard_idx, _ = split_ids(ids)
    found, rows_of = [np.zeros(0, np.int64)], [np.zeros((0, emb.dim), np.float32)]
    for s in np.unique(shard_idx).tolist():
        x, sids = emb.read_shard(int(s))
        wanted = ids[shard_idx == s]
        rows = np.searchsorted(sids, wanted)
        ok = (rows < len(sids)) & (sids[np.minimum(rows, len(sids) - 1)] == wanted)
        found.append(wanted[ok])
        rows_of.append(np.asarray(x[rows[ok]], np.float32))  # only the wanted rows are kept, not the shard
    return np.concatenate(found), np.concatenate(rows_of)


class LazyVectors(dict):
    """Embeddings fetched a pool shard at a time, on first use (the cluster strategy's candidates are not known up front)."""

    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.loaded: set[int] = set()

    def __missing__(self, pid: int) -> np.ndarray:
        s = int(split_ids([pid])[0][0])
        if s in self.loaded:
            raise KeyError(pid)
        self.loaded.add(s)
        x, sids = self.emb.read_shard(s)
        for i, v in zip(sids.tolist(), x):
            self[int(i)] = v
        return self[pid]
