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


def encode_shard(trained: faiss.Index, x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    index = faiss.clone_index(trained)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        codes = index.sa_encode(x) if len(x) else np.zeros((0, index.sa_code_size()), np.uint8)
        return np.array([0, len(x)], np.int64), ids, codes.reshape(len(x), -1)
    index.add_with_ids(x, ids)
    invlists = ivf.invlists
    lists = [get_invlist(invlists, lst) for lst in range(ivf.nlist)]
    offsets = np.zeros(ivf.nlist + 1, np.int64)
    offsets[1:] = np.cumsum([len(list_ids) for list_ids, _ in lists])
    code_size = invlists.code_size
    all_ids = np.concatenate([list_ids for list_ids, _ in lists]) if len(x) else np.zeros(0, np.int64)
    all_codes = (
        np.concatenate([c.reshape(-1, code_size) for _, c in lists]) if len(x) else np.zeros((0, code_size), np.uint8)
    )
    return offsets, all_ids, all_codes


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
