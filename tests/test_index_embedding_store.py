"""EmbeddingStore: atomic per-shard writes, resume bookkeeping and refusal of foreign stores."""

import os

import numpy as np
import pytest

from sept.data.identity import make_ids
from sept.errors import SeptError
from sept.index.embedding_store import EmbeddingStore, EncoderIdentity

ENC = EncoderIdentity(identity="abc", arch="resnet18_small", dim=4, image_size=32)


def test_write_read_and_resume_bookkeeping(tmp_path):
    pool = [f"/p/{i}.tar" for i in range(3)]
    store = EmbeddingStore.create_or_open(str(tmp_path / "e.zarr"), encoder=ENC, pool=pool)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    store.write_shard(1, x, make_ids(1, range(5)), report=dict(bad=2))
    assert store.missing_shards() == [0, 2]
    xr, ids = store.read_shard(1)
    np.testing.assert_allclose(xr, x.astype(np.float16).astype(np.float32))
    assert ids.tolist() == make_ids(1, range(5)).tolist()
    assert store.shard_attrs(1)["bad"] == 2
    assert not [n for n in os.listdir(tmp_path / "e.zarr" / "shards") if n.startswith(".tmp")]
    # the pool may grow; a reopen keeps what is done
    again = EmbeddingStore.create_or_open(store.path, encoder=ENC, pool=pool + ["/p/3.tar"])
    assert again.missing_shards() == [0, 2, 3]


def test_refuses_other_encoder_and_reordered_pool(tmp_path):
    path = str(tmp_path / "e.zarr")
    EmbeddingStore.create_or_open(path, encoder=ENC, pool=["/a.tar", "/b.tar"])
    other = EncoderIdentity(identity="zzz", arch="resnet18_small", dim=4, image_size=32)
    with pytest.raises(SeptError, match="encoder"):
        EmbeddingStore.create_or_open(path, encoder=other, pool=["/a.tar", "/b.tar"])
    with pytest.raises(SeptError, match="different pool"):
        EmbeddingStore.create_or_open(path, encoder=ENC, pool=["/b.tar", "/a.tar"])


def test_sample_reads_bounded_subset(tmp_path):
    store = EmbeddingStore.create_or_open(str(tmp_path / "e.zarr"), encoder=ENC, pool=["/a", "/b"])
    for s in range(2):
        store.write_shard(s, np.full((10, 4), s, np.float32), make_ids(s, range(10)))
    sample = store.sample(6, seed=0)
    assert sample.shape == (6, 4)
    assert store.total_count() == 20
