"""The pool's dedup table, its one home: which samples ``sept dedup`` removed, who stands for each, and why.

It lives inside the embeddings store it was computed from (docs/zarr-layout.md)::

    EMB.zarr/dedup/
      zarr.json        attrs: kind="sept-dedup", fingerprint (of the embeddings: encoder, shards and
                       their counts), config (the resolved DedupConfig), summary (counts by reason)
      removed          (n,) int64, ascending: the sample ids removed
      kept             (n,) int64: the representative that stands for each removed id
      reason           (n,) uint8: EXACT (same image bytes) or NEAR (cosine >= the threshold)
      similarity       (n,) float32: cosine between the removed vector and its representative's

The group is staged and published whole (``sept.io.publish_dir``), so a table that exists is
complete. A table whose fingerprint differs from the store's embeddings is stale: readers refuse
it rather than skip ids that no longer mean what they did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import zarr

from sept import storage
from sept.errors import SeptError
from sept.io import publish_dir, staging_dir

KIND = "sept-dedup"
TABLE_DIR = "dedup"
EXACT, NEAR = 0, 1
REASONS = {EXACT: "exact", NEAR: "near"}


def table_path(embeddings: str) -> str:
    return storage.join(storage.resolve(embeddings), TABLE_DIR)


@dataclass
class DedupTable:
    """Removed ids (ascending) with their representatives, reasons and similarities, plus the table's attrs."""

    removed: np.ndarray
    kept: np.ndarray
    reason: np.ndarray
    similarity: np.ndarray
    attrs: dict

    def __post_init__(self):
        order = np.argsort(self.removed, kind="stable")
        self.removed = np.asarray(self.removed, np.int64)[order]
        self.kept = np.asarray(self.kept, np.int64)[order]
        self.reason = np.asarray(self.reason, np.uint8)[order]
        self.similarity = np.asarray(self.similarity, np.float32)[order]
        if len(self.removed) and np.any(np.diff(self.removed) == 0):
            raise ValueError("a dedup table lists each removed id once")

    def __len__(self) -> int:
        return len(self.removed)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs.get("fingerprint", ""))

    def is_removed(self, ids: np.ndarray) -> np.ndarray:
        """A boolean mask over ``ids`` (any shape): which the table removes."""
        ids = np.asarray(ids, np.int64)
        if not len(self.removed):
            return np.zeros(ids.shape, bool)
        at = np.minimum(np.searchsorted(self.removed, ids), len(self.removed) - 1)
        return self.removed[at] == ids

    def stands_for(self, ids: np.ndarray) -> np.ndarray:
        """How many removed samples each of ``ids`` represents (0 for most)."""
        kept, counts = np.unique(self.kept, return_counts=True)
        ids = np.asarray(ids, np.int64)
        if not len(kept):
            return np.zeros(ids.shape, np.int64)
        at = np.minimum(np.searchsorted(kept, ids), len(kept) - 1)
        return np.where(kept[at] == ids, counts[at], 0)

    def summary(self) -> dict:
        return dict(
            removed=len(self),
            exact=int(np.count_nonzero(self.reason == EXACT)),
            near=int(np.count_nonzero(self.reason == NEAR)),
            representatives=int(len(np.unique(self.kept))),
        )

    def write(self, embeddings: str) -> str:
        """Publish the table in the store, replacing an older one; returns its path."""
        final = table_path(embeddings)
        tmp = staging_dir(final)
        group = zarr.open_group(tmp, mode="w")
        n = len(self)
        chunk = max(1, min(n, 1 << 20))
        for name, values, dtype in (
            ("removed", self.removed, "int64"),
            ("kept", self.kept, "int64"),
            ("reason", self.reason, "uint8"),
            ("similarity", self.similarity, "float32"),
        ):
            group.create_array(name, shape=(n,), dtype=dtype, chunks=(chunk,))[...] = values
        group.attrs.update(kind=KIND, **{**self.attrs, "summary": self.summary()})
        publish_dir(tmp, final, replace=True)
        return final

    @classmethod
    def read(cls, embeddings: str, *, fingerprint: str | None = None) -> DedupTable | None:
        """The store's table, or None if it has none. With ``fingerprint``, a table computed from other
        embeddings (the pool grew, or was re-embedded) is an error naming the command that renews it."""
        path = table_path(embeddings)
        if not storage.exists(storage.join(path, "zarr.json")):
            return None
        with storage.open_file(storage.join(path, "zarr.json"), "r") as f:
            attrs = json.load(f).get("attributes", {})
        if attrs.get("kind") != KIND:
            raise SeptError(f"{path} is not a sept dedup table")
        if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
            raise SeptError(
                f"dedup table {path} was computed from other embeddings (fingerprint {attrs.get('fingerprint')}, "
                f"now {fingerprint}); rerun `sept dedup --embeddings {embeddings}`, or pass --no-dedup"
            )
        group = zarr.open_group(storage.zarr_store(path, read_only=True), mode="r")
        return cls(*(np.asarray(group[name][...]) for name in ("removed", "kept", "reason", "similarity")), attrs)
