"""The embeddings store: one Zarr v3 group holding, per pool shard, float16 vectors and int64 ids.

Layout (docs/zarr-layout.md)::

    EMB.zarr/
      zarr.json                 attrs: kind="sept-embeddings", dim, encoder (identity, arch, image_size),
                                pool (the shard listing, whose order defines shard indices)
      shards/
        00000/                  one group per *complete* pool shard
          zarr.json             attrs: shard (path), count, samples, bad, bad_kinds, truncated,
                                bad_samples ([key, reason] pairs)
          vectors               (count, dim) float16, chunks of CHUNK_ROWS rows
          ids                   (count,) int64, see sept.data.identity
          hashes                (count, 2) uint64, each sample's image-bytes hash (sept.data.embed_shard;
                                absent in stores embedded before hashes were recorded)
      quarantine.jsonl          every bad sample of the complete shards: shard, key, kind, reason

A shard group is written under a temporary name and renamed into place once its data is on disk,
so a shard group that exists is complete: that rename is the whole resume story. In an object
store (``sept.storage``) the group is uploaded with its ``zarr.json`` last, and a group counts as
existing only once that file does. Writers of
different shards never touch the same files, so any number of processes can write at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from sept import storage
from sept.errors import SeptError
from sept.io import atomic_file, publish_dir, remove_stale_staging, staging_dir

KIND = "sept-embeddings"
CHUNK_ROWS = 65536
QUARANTINE = "quarantine.jsonl"


def shard_name(shard_index: int) -> str:
    return f"{shard_index:05d}"


@dataclass
class EncoderIdentity:
    """What the vectors mean: two stores (or a store and a query) are comparable only if these match."""

    identity: str
    arch: str
    dim: int
    image_size: int

    @classmethod
    def of(cls, bundle) -> EncoderIdentity:
        return cls(bundle.identity, bundle.arch, int(bundle.dim), int(bundle.image_size))

    def to_dict(self) -> dict:
        return dict(identity=self.identity, arch=self.arch, dim=self.dim, image_size=self.image_size)


class EmbeddingStore:
    """Read and write access to one embeddings store on a local or shared filesystem, or a URL."""

    def __init__(self, path: str):
        self.path = storage.resolve(path)

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str, *, encoder: EncoderIdentity, pool: list[str]) -> EmbeddingStore:
        """Create the store, or reopen it for the same encoder. The pool may have grown since."""
        store = cls(path)
        if storage.exists(storage.join(store.path, "zarr.json")):
            attrs = store.attrs
            if attrs.get("kind") != KIND:
                raise SeptError(f"{path} exists and is not a sept embeddings store; choose another --out")
            if attrs["encoder"]["identity"] != encoder.identity:
                raise SeptError(
                    f"{path} holds embeddings from encoder {attrs['encoder']['identity']}, "
                    f"not {encoder.identity}; choose another --out"
                )
            old_pool = attrs["pool"]
            if pool[: len(old_pool)] != old_pool:
                raise SeptError(
                    f"{path} was embedded from a different pool listing; shard indices would change "
                    f"(first difference at shard {_first_difference(old_pool, pool)}); choose another --out"
                )
            group = zarr.open_group(storage.zarr_store(store.path), mode="r+")
            group.attrs["pool"] = list(pool)
            return store
        if storage.listdir(store.path):
            raise SeptError(f"{path} exists and is not a sept embeddings store; choose another --out")
        group = zarr.open_group(storage.zarr_store(store.path), mode="w")
        group.require_group("shards")
        group.attrs.update(kind=KIND, dim=encoder.dim, encoder=encoder.to_dict(), pool=list(pool))
        return store

    @classmethod
    def open(cls, path: str) -> EmbeddingStore:
        store = cls(path)
        if not storage.exists(storage.join(store.path, "zarr.json")):
            raise SeptError(f"embeddings store not found: {path}")
        if store.attrs.get("kind") != KIND:
            raise SeptError(f"not a sept embeddings store: {path}")
        return store

    # ---- metadata -------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        with storage.open_file(storage.join(self.path, "zarr.json"), "r") as f:
            return json.load(f).get("attributes", {})

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def encoder(self) -> EncoderIdentity:
        return EncoderIdentity(**self.attrs["encoder"])

    @property
    def pool(self) -> list[str]:
        return list(self.attrs["pool"])

    def _shard_dir(self, shard_index: int) -> str:
        return storage.join(self.path, "shards", shard_name(shard_index))

    def is_complete(self, shard_index: int) -> bool:
        return storage.exists(storage.join(self._shard_dir(shard_index), "zarr.json"))

    def complete_shards(self) -> list[int]:
        if storage.is_url(self.path):  # one listing, not one request per shard
            done = {
                storage.basename(storage.dirname(u))
                for u in storage.glob(storage.join(self.path, "shards", "*", "zarr.json"))
            }
            return [i for i in range(len(self.pool)) if shard_name(i) in done]
        return [i for i in range(len(self.pool)) if self.is_complete(i)]

    def missing_shards(self) -> list[int]:
        done = set(self.complete_shards())
        return [i for i in range(len(self.pool)) if i not in done]

    # ---- data -----------------------------------------------------------------------------
    def write_shard(
        self,
        shard_index: int,
        vectors: np.ndarray,
        ids: np.ndarray,
        *,
        report: dict | None = None,
        hashes: np.ndarray | None = None,
    ) -> None:
        """Write one shard atomically: build it under a temporary name, then rename it into place."""
        final = self._shard_dir(shard_index)
        n, dim = len(ids), self.dim
        if vectors.shape != (n, dim):
            raise ValueError(f"shard {shard_index}: vectors {vectors.shape} do not match ({n}, {dim})")
        tmp = staging_dir(final)
        group = zarr.open_group(tmp, mode="w")
        chunk = max(1, min(n, CHUNK_ROWS))
        group.create_array("vectors", shape=(n, dim), dtype="float16", chunks=(chunk, dim))[...] = vectors.astype(
            np.float16
        )
        group.create_array("ids", shape=(n,), dtype="int64", chunks=(chunk,))[...] = ids.astype(np.int64)
        if hashes is not None:
            if hashes.shape != (n, 2):
                raise ValueError(f"shard {shard_index}: hashes {hashes.shape} do not match ({n}, 2)")
            group.create_array("hashes", shape=(n, 2), dtype="uint64", chunks=(chunk, 2))[...] = hashes
        group.attrs.update(shard=self.pool[shard_index], count=int(n), **(report or {}))
        # The rename marks the shard complete. When another attempt at the same shard finished
        # first, its data is the same and it is kept.
        publish_dir(tmp, final)

    def remove_partial_writes(self) -> int:
        """Delete temporary shard groups left by writers that died; call only while none is writing."""
        return remove_stale_staging(storage.join(self.path, "shards"))

    def set_attrs(self, **values) -> None:
        """Update the root attributes; only the coordinator calls this, never a shard writer."""
        zarr.open_group(storage.zarr_store(self.path), mode="r+").attrs.update(**values)

    def write_quarantine(self) -> dict:
        """Rewrite quarantine.jsonl from the complete shards' reports; returns the counts.

        {"path", "samples" (vectors + bad), "bad", "kinds" (count per kind)}
        """
        from sept.data.embed_shard import BAD_KINDS, bad_kind

        kinds = {kind: 0 for kind in BAD_KINDS}
        samples = bad = 0
        path = storage.join(self.path, QUARANTINE)
        with atomic_file(path, "w") as f:
            for i in self.complete_shards():
                attrs = self.shard_attrs(i)
                shard_bad = int(attrs.get("bad", 0))
                samples += int(attrs["count"]) + shard_bad
                bad += shard_bad
                listed = attrs.get("bad_samples", [])
                for key, reason in listed:
                    kind = bad_kind(reason)
                    f.write(
                        json.dumps(dict(shard_index=i, shard=attrs["shard"], key=key, kind=kind, reason=reason)) + "\n"
                    )
                for kind, count in (attrs.get("bad_kinds") or {}).items():
                    kinds[kind] = kinds.get(kind, 0) + int(count)
                if "bad_kinds" not in attrs:  # a shard written before kinds were counted
                    for _, reason in listed:
                        kinds[bad_kind(reason)] += 1
        return dict(path=path, samples=samples, bad=bad, kinds=kinds)

    def shard_attrs(self, shard_index: int) -> dict:
        with storage.open_file(storage.join(self._shard_dir(shard_index), "zarr.json"), "r") as f:
            return json.load(f).get("attributes", {})

    def _open_shard(self, shard_index: int) -> zarr.Group:
        return zarr.open_group(storage.zarr_store(self._shard_dir(shard_index), read_only=True), mode="r")

    def read_shard(self, shard_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors as float32, ids) of one complete shard."""
        if not self.is_complete(shard_index):
            raise SeptError(f"shard {shard_index} ({self.pool[shard_index]}) is not embedded in {self.path}")
        group = self._open_shard(shard_index)
        return np.asarray(group["vectors"][...], dtype=np.float32), np.asarray(group["ids"][...])

    def read_hashes(self, shard_index: int, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Content hashes (n, 2) uint64 of rows start:stop of one shard, or None if it has none."""
        group = self._open_shard(shard_index)
        if "hashes" not in group:
            return None
        return np.asarray(group["hashes"][start:stop])

    def shard_count(self, shard_index: int) -> int:
        return int(self.shard_attrs(shard_index)["count"])

    def read_rows(self, shard_index: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors as float32, ids) of rows start:stop of one shard; reads only their chunks."""
        group = self._open_shard(shard_index)
        return np.asarray(group["vectors"][start:stop], dtype=np.float32), np.asarray(group["ids"][start:stop])

    def iter_batches(
        self, shard_indices: list[int], batch_rows: int = CHUNK_ROWS
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors, ids) of the given shards, at most batch_rows at a time: memory is one batch."""
        for i in shard_indices:
            count = self.shard_count(i)
            for start in range(0, count, batch_rows):
                yield self.read_rows(i, start, min(count, start + batch_rows))

    def iter_shards(self, shard_indices: list[int] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for i in self.complete_shards() if shard_indices is None else shard_indices:
            x, ids = self.read_shard(i)
            yield i, x, ids

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every vector and id, concatenated in shard order (for small pools and tests)."""
        xs, idss = [], []
        for _, x, ids in self.iter_shards():
            xs.append(x)
            idss.append(ids)
        if not xs:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(idss)

    def total_count(self) -> int:
        return sum(self.shard_count(i) for i in self.complete_shards())

    def sample(self, n: int, *, seed: int = 0) -> np.ndarray:
        """A uniform random sample of up to n vectors, read chunk by chunk so memory stays ~n*dim.

        Only the chunks holding sampled rows are read, never a whole pool in memory.
        """
        return self.sample_with_ids(n, seed=seed)[0]

    def sample_with_ids(
        self, n: int, *, seed: int = 0, shard_indices: list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, ids) of up to n rows drawn uniformly without replacement from the given
        complete shards (default: all), in store order; one chunk in memory at a time."""
        shard_indices = self.complete_shards() if shard_indices is None else list(shard_indices)
        counts = {i: self.shard_count(i) for i in shard_indices}
        total = sum(counts.values())
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=min(n, total), replace=False))
        xs, idss, start = [], [], 0
        for i, count in counts.items():
            local = chosen[(chosen >= start) & (chosen < start + count)] - start
            start += count
            if not len(local):
                continue
            group = self._open_shard(i)
            vectors, ids = group["vectors"], group["ids"]
            rows = vectors.chunks[0]
            for c in np.unique(local // rows):
                in_chunk = local[(local >= c * rows) & (local < (c + 1) * rows)] - c * rows
                stop = min(count, (c + 1) * rows)
                xs.append(np.asarray(vectors[c * rows : stop], dtype=np.float32)[in_chunk])
                idss.append(np.asarray(ids[c * rows : stop])[in_chunk])
        if not xs:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(idss)


def _first_difference(a: list[str], b: list[str]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
