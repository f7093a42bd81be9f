"""The index store: a trained FAISS index and its shards' inverted lists, in one Zarr v3 group.

Layout (docs/zarr-layout.md)::

    INDEX.zarr/
      zarr.json            attrs: kind="sept-index", spec (IndexSpec, factory resolved), factory_reason,
                           dim, metric, encoder, embeddings (path and fingerprint), pool, assignment
                           (pool shards per index shard), indexed_counts (vectors per pool shard),
                           ntotal, nprobe (chosen by `sept index eval`), memory_budget, complete
      trained              uint8: faiss.serialize_index of the trained, empty index
      shards/
        00000/             one group per complete index shard
          offsets          (nlist + 1,) int64: list l holds rows offsets[l]:offsets[l+1]
          ids              (n,) int64 global sample ids (the group's attrs hold ntotal = n)
          codes            (n, code_size) uint8, exactly as faiss stores them
      config.json          the resolved config and summary of the last `sept index`
      eval.json            the last `sept index eval` table

The store may live at an object-store URL (``sept.storage``); a shard group counts as present
once its ``zarr.json``, uploaded last, does.

A non-IVF index (Flat, PQ, ...) is stored as a single list of its standalone codes. A shard
loads into faiss without re-encoding, and without reading the other shards."""

from __future__ import annotations

import json

import faiss
import numpy as np
import zarr

from sept import storage
from sept.errors import SeptError
from sept.io import publish_dir, staging_dir

KIND = "sept-index"


def shard_name(index_shard: int) -> str:
    return f"{index_shard:05d}"


class IndexStore:
    def __init__(self, path: str):
        self.path = storage.resolve(path)

    @classmethod
    def open(cls, path: str) -> IndexStore:
        store = cls(path)
        if not storage.exists(storage.join(store.path, "zarr.json")) or store.attrs.get("kind") != KIND:
            raise SeptError(f"not a sept index store: {path}")
        return store

    @classmethod
    def create(cls, path: str, *, trained: faiss.Index, attrs: dict) -> IndexStore:
        store = cls(path)
        group = zarr.open_group(storage.zarr_store(store.path), mode="w")
        blob = faiss.serialize_index(trained)
        group.create_array("trained", shape=blob.shape, dtype="uint8", chunks=(max(1, len(blob)),))[...] = blob
        group.require_group("shards")
        group.attrs.update(kind=KIND, complete=False, **attrs)
        return store

    @property
    def attrs(self) -> dict:
        with storage.open_file(storage.join(self.path, "zarr.json"), "r") as f:
            return json.load(f).get("attributes", {})

    def update_attrs(self, **values) -> None:
        zarr.open_group(storage.zarr_store(self.path), mode="r+").attrs.update(**values)

    @property
    def nshards(self) -> int:
        return len(self.attrs["assignment"])

    def trained_index(self) -> faiss.Index:
        blob = np.asarray(
            zarr.open_group(storage.zarr_store(self.path, read_only=True), mode="r")["trained"][...], dtype=np.uint8
        )
        return faiss.deserialize_index(blob)

    def _shard_dir(self, index_shard: int) -> str:
        return storage.join(self.path, "shards", shard_name(index_shard))

    def is_complete(self, index_shard: int) -> bool:
        return storage.exists(storage.join(self._shard_dir(index_shard), "zarr.json"))

    def write_shard(self, index_shard: int, offsets: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> None:
        """Write one index shard under a temporary name, then rename it into place."""
        final = self._shard_dir(index_shard)
        tmp = staging_dir(final)
        group = zarr.open_group(tmp, mode="w")
        n, code_size = codes.shape
        group.create_array("offsets", shape=offsets.shape, dtype="int64", chunks=(max(1, len(offsets)),))[...] = offsets
        chunk = max(1, min(n, 262144))
        group.create_array("ids", shape=(n,), dtype="int64", chunks=(chunk,))[...] = ids
        group.create_array("codes", shape=(n, code_size), dtype="uint8", chunks=(chunk, code_size))[...] = codes
        group.attrs.update(ntotal=int(n))
        # An encoding is deterministic, so a shard already in place (written by an earlier attempt
        # that was taken for stalled) is the same one: keep it. Replacing it would leave a moment,
        # or after a kill for good, with no shard there.
        publish_dir(tmp, final)

    def shard_ntotal(self, index_shard: int) -> int:
        """Vectors in one complete index shard, from its attributes (its ids array's shape for a shard
        written without them): never reads its codes."""
        if not self.is_complete(index_shard):
            raise SeptError(f"index shard {index_shard} is missing from {self.path}")
        with storage.open_file(storage.join(self._shard_dir(index_shard), "zarr.json"), "r") as f:
            ntotal = json.load(f).get("attributes", {}).get("ntotal")
        if ntotal is None:
            group = zarr.open_group(storage.zarr_store(self._shard_dir(index_shard), read_only=True), mode="r")
            ntotal = group["ids"].shape[0]
        return int(ntotal)

    def read_shard(self, index_shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.is_complete(index_shard):
            raise SeptError(f"index shard {index_shard} is missing from {self.path}")
        group = zarr.open_group(storage.zarr_store(self._shard_dir(index_shard), read_only=True), mode="r")
        return (
            np.asarray(group["offsets"][...]),
            np.asarray(group["ids"][...]),
            np.asarray(group["codes"][...], dtype=np.uint8),
        )

    def load_shard(self, index_shard: int) -> faiss.Index:
        """The index shard as a searchable faiss index."""
        from sept.index.codes import index_from_codes

        offsets, ids, codes = self.read_shard(index_shard)
        index = index_from_codes(self.trained_index(), offsets, ids, codes)
        nprobe = self.attrs.get("nprobe")
        if nprobe and faiss.try_extract_index_ivf(index) is not None:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
        return index
