"""Encoding vectors into an index shard's CSR codes, and loading such codes back into faiss.

Numpy in, numpy out: ``encode_shard(trained, x, ids) -> (offsets, ids, codes)`` and
``index_from_codes(trained, offsets, ids, codes) -> faiss.Index``. For IVF indexes the CSR rows
are the inverted lists; any other index is one list of its standalone (sa_encode) codes.
"""

from __future__ import annotations

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist


def train_index(index: faiss.Index, x: np.ndarray, *, seed: int = 0) -> faiss.Index:
    """Train an empty index on a sample, with a fixed seed for its k-means and PQ."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    if not index.is_trained:
        index.train(np.ascontiguousarray(x, dtype=np.float32))
    return index


class ShardEncoder:
    """Encodes one index shard batch by batch: memory is the shard's codes plus one batch.

    ``add(x, ids)`` as often as needed, then ``finish() -> (offsets, ids, codes)``.
    """

    def __init__(self, trained: faiss.Index):
        self.index = faiss.clone_index(trained)
        self.ivf = faiss.try_extract_index_ivf(self.index)
        self.code_parts: list[np.ndarray] = []
        self.id_parts: list[np.ndarray] = []

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        if not len(x):
            return
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.ivf is None:
            self.code_parts.append(self.index.sa_encode(x).reshape(len(x), -1))
            self.id_parts.append(ids)
        else:
            self.index.add_with_ids(x, ids)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.ivf is None:
            code_size = self.index.sa_code_size()
            codes = np.concatenate(self.code_parts) if self.code_parts else np.zeros((0, code_size), np.uint8)
            ids = np.concatenate(self.id_parts) if self.id_parts else np.zeros(0, np.int64)
            return np.array([0, len(ids)], np.int64), ids, codes
        invlists = self.ivf.invlists
        code_size = invlists.code_size
        sizes = np.array([invlists.list_size(lst) for lst in range(self.ivf.nlist)], np.int64)
        offsets = np.zeros(self.ivf.nlist + 1, np.int64)
        offsets[1:] = np.cumsum(sizes)
        all_ids = np.empty(int(offsets[-1]), np.int64)
        all_codes = np.empty((int(offsets[-1]), code_size), np.uint8)
        for lst in np.flatnonzero(sizes):
            list_ids, list_codes = get_invlist(invlists, int(lst))
            a, b = offsets[lst], offsets[lst + 1]
            all_ids[a:b] = list_ids
            all_codes[a:b] = list_codes.reshape(-1, code_size)
        self.index.reset()  # the CSR arrays now hold the codes; don't keep the faiss copy around
        return offsets, all_ids, all_codes


def encode_shard(trained: faiss.Index, x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, ids, codes) of x encoded by the trained index, in CSR form by inverted list."""
    encoder = ShardEncoder(trained)
    encoder.add(x, ids)
    return encoder.finish()


def index_from_codes(trained: faiss.Index, offsets: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> faiss.Index:
    index = faiss.clone_index(trained)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        mapped = faiss.IndexIDMap2(index)
        if len(ids):
            mapped.add_with_ids(index.sa_decode(np.ascontiguousarray(codes)), ids)
        return mapped
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    for lst in range(ivf.nlist):
        a, b = int(offsets[lst]), int(offsets[lst + 1])
        if b > a:
            ivf.invlists.add_entries(lst, b - a, faiss.swig_ptr(ids[a:b]), faiss.swig_ptr(codes[a:b]))
    ivf.ntotal = len(ids)
    index.ntotal = len(ids)
    return index
