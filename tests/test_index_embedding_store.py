"""EmbeddingStore: atomic per-shard writes, resume bookkeeping and refusal of foreign stores."""

import os
from pathlib import Path

import numpy as np
import pytest

from sept.data.identity import make_ids
from sept.errors import SeptError
from sept.index.embedding_store import EmbeddingStore, EncoderIdentity
from sept.io import is_staging_name

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
    assert not [n for n in os.listdir(tmp_path / "e.zarr" / "shards") if is_staging_name(n)]
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


def _write_all(path: str, order: list[int]) -> None:
    store = EmbeddingStore(path)
    for s in order:
        store.write_shard(s, _shard_vectors(s), make_ids(s, range(50)), report=dict(bad=0))


def _shard_vectors(s: int) -> np.ndarray:
    return np.random.default_rng(s).normal(size=(50, 4)).astype(np.float32)


def test_two_processes_writing_at_once_store_each_shard_once(tmp_path):
    import multiprocessing

    path = str(tmp_path / "e.zarr")
    EmbeddingStore.create_or_open(path, encoder=ENC, pool=[f"/p/{i}.tar" for i in range(8)])
    ctx = multiprocessing.get_context("spawn")
    # both write every shard, in opposite orders: they race on each one, and must not corrupt any
    procs = [ctx.Process(target=_write_all, args=(path, order)) for order in (list(range(8)), list(range(7, -1, -1)))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = EmbeddingStore.open(path)
    assert store.missing_shards() == [] and store.remove_partial_writes() == 0
    x, ids = store.read_all()
    assert ids.tolist() == [int(i) for s in range(8) for i in make_ids(s, range(50))]
    np.testing.assert_allclose(x, np.concatenate([_shard_vectors(s) for s in range(8)]).astype(np.float16), rtol=0)


def test_quarantine_report_lists_every_bad_sample(tmp_path):
    store = EmbeddingStore.create_or_open(str(tmp_path / "e.zarr"), encoder=ENC, pool=["/a.tar", "/b.tar"])
    store.write_shard(
        0,
        np.zeros((2, 4), np.float32),
        make_ids(0, [0, 2]),
        report=dict(bad=2, bad_samples=[["k1", "jpg: empty image bytes"], ["k3", "no image member (members: json)"]]),
    )
    store.write_shard(
        1,
        np.zeros((1, 4), np.float32),
        make_ids(1, [0]),
        report=dict(bad=1, bad_samples=[["", "truncated shard: no end-of-archive marker"]]),
    )
    counts = store.write_quarantine()
    assert (counts["samples"], counts["bad"]) == (6, 3)
    assert counts["kinds"] == dict(undecodable=0, zero_byte=1, no_image=1, truncated=1, too_large=0)
    import json

    lines = [json.loads(line) for line in Path(counts["path"]).read_text().splitlines()]
    assert [(q["shard"], q["key"], q["kind"]) for q in lines] == [
        ("/a.tar", "k1", "zero_byte"),
        ("/a.tar", "k3", "no_image"),
        ("/b.tar", "", "truncated"),
    ]
