"""Pools and stores in object storage: the real S3 protocol against moto's standalone server.

A pool uploaded to a bucket is embedded into a store in the bucket, indexed into another and
selected into a selection folder in the bucket, on the two-node Ray cluster. Interrupted uploads
are redone by the next run and the rest kept: a shard group cut off before its ``zarr.json``, and a
copy job whose parts were uploaded but not its done-marker. The server listens on 127.0.0.1 and is
stopped afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import fsspec
import numpy as np
import pytest
import torch
from conftest import VENV_BIN
from PIL import Image
from test_embed_pools import write_good_shard

from sept import storage
from sept.data import selection_folder
from sept.data.samples import iter_samples
from sept.data.shards import list_shards
from sept.data.task_subset import iter_task_samples, open_task_data
from sept.index.embedding_store import EmbeddingStore
from sept.index.store import IndexStore
from sept.training.encoder import build_backbone, save_encoder

pytestmark = pytest.mark.integration
BUCKET = "sept-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on loopback; yields the environment that points fsspec and boto at it."""
    port = _free_port()
    server = subprocess.Popen(
        [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = dict(
        FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read its environment at import, before this
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield settings
    finally:
        server.terminate()
        server.wait(timeout=30)
        fsspec.config.conf.pop("s3", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_small", width=8)
    path = str(tmp_path_factory.mktemp("encoder") / "enc.pt")
    save_encoder(path, backbone, arch="resnet18_small", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    return path


def _upload_pool(tmp_path, shards: int, per_shard: int) -> list[str]:
    urls = []
    for i in range(shards):
        local = str(tmp_path / f"{i:05d}.tar")
        write_good_shard(local, per_shard, seed=i)
        url = f"s3://{BUCKET}/pool/{i:05d}.tar"
        storage.put_file(local, url)
        urls.append(url)
    return urls


def test_pool_listed_and_read_from_a_bucket(s3_env, tmp_path):
    urls = _upload_pool(tmp_path, shards=2, per_shard=5)
    assert list_shards(f"s3://{BUCKET}/pool/") == urls
    assert list_shards(f"s3://{BUCKET}/pool/{{00000..00001}}.tar") == urls
    local = [s.key for s in iter_samples(str(tmp_path / "00001.tar"))]
    assert [s.key for s in iter_samples(urls[1])] == local
    with pytest.raises(Exception, match=r"pool shard not found: s3://sept-test/pool/00002.tar"):
        list_shards(f"s3://{BUCKET}/pool/{{00000..00002}}.tar")


def test_bucket_pool_embedded_and_indexed_into_the_bucket_and_resumed(s3_env, ray_cluster, encoder_path, tmp_path):
    env = {**ray_cluster.env, **s3_env}
    pool = _upload_pool(tmp_path, shards=3, per_shard=12)
    emb = f"s3://{BUCKET}/emb.zarr"

    def embed() -> dict:
        proc = _run(
            env,
            "embed",
            "--pool",
            f"s3://{BUCKET}/pool/",
            "--encoder",
            encoder_path,
            "--out",
            emb,
            "--workers",
            "2",
            "--batch-size",
            "8",
            "--ray-address",
            ray_cluster.address,
        )
        return json.loads(proc.stdout[proc.stdout.index("{") :])

    first = embed()
    store = EmbeddingStore.open(emb)
    assert store.pool == pool and store.complete_shards() == [0, 1, 2]
    vectors, ids = store.read_all()
    assert vectors.shape == (36, store.dim) and len(set(ids.tolist())) == 36
    assert first["complete"] == 3

    # An upload cut off before its commit file: the arrays are there, zarr.json is not.
    before = store.read_shard(1)[0]
    storage.remove(storage.join(emb, "shards", "00001", "zarr.json"))
    assert EmbeddingStore.open(emb).missing_shards() == [1]
    embed()
    store = EmbeddingStore.open(emb)
    assert store.complete_shards() == [0, 1, 2]
    np.testing.assert_allclose(store.read_shard(1)[0], before, atol=1e-3)

    index = f"s3://{BUCKET}/index.zarr"
    _run(
        env,
        "index",
        "--embeddings",
        emb,
        "--out",
        index,
        "--shards",
        "2",
        "--factory",
        "Flat",
        "--ray-address",
        ray_cluster.address,
    )
    built = IndexStore.open(index)
    assert [built.is_complete(i) for i in range(built.nshards)] == [True, True]
    found = sorted(np.concatenate([built.read_shard(i)[1] for i in range(built.nshards)]).tolist())
    assert found == sorted(ids.tolist())
    assert storage.isfile(storage.join(index, "config.json"))

    target = _target(tmp_path / "target")
    sel = f"s3://{BUCKET}/sel"

    def select() -> dict:
        proc = _run(
            env,
            "select",
            "--index",
            index,
            "--encoder",
            encoder_path,
            "--target",
            target,
            "--budget",
            "10",
            "--out",
            sel,
            # the untrained encoder puts every random picture within the guard's threshold of the held-out ones
            "--no-leakage-guard",
            "--ray-address",
            ray_cluster.address,
        )
        return json.loads(proc.stdout[proc.stdout.index("{") :])

    first = select()
    task = first["tasks"]["target"]
    manifest = selection_folder.read_manifest(sel, "target")
    assert len(manifest) == 10 == first["samples"] and len({r["id"] for r in manifest}) == 10
    shards = selection_folder.shards_dir(sel)
    parts = sorted(n for n in storage.listdir(shards) if n.endswith(".tar"))
    assert parts == first["shards"] and task is not None
    by_key = {s.key: s for p in parts for s in iter_samples(storage.join(shards, p))}
    assert sorted(by_key) == sorted(r["key"] for r in manifest)
    digests = {p: storage.read_bytes(storage.join(shards, p)) for p in parts}

    # A copy job cut off after its parts were uploaded but before its done-marker, and a stray part.
    jobs = selection_folder.read_catalog(shards).jobs
    storage.remove(selection_folder.catalog_marker(shards, jobs[0]))
    storage.put_file(str(tmp_path / "00000.tar"), storage.join(shards, "part-stray-000000.tar"))
    storage.remove(storage.join(selection_folder.task_dir(sel, "target"), "manifest.jsonl"))
    again = select()
    assert again["copied"] == 10
    assert sorted(n for n in storage.listdir(shards) if n.endswith(".tar")) == parts
    assert {p: storage.read_bytes(storage.join(shards, p)) for p in parts} == digests
    assert selection_folder.read_manifest(sel, "target") == manifest

    # What a trainer reads: the task's subset straight from the bucket, every shard's hash checked.
    subset = open_task_data(f"{sel}/tasks/target", verify="hash")
    assert sorted(s.key for s in iter_task_samples(subset)) == sorted(r["key"] for r in manifest)
    # ... its compact samples group read from the bucket slice by slice, pool ids as the manifest says.
    assert storage.isfile(f"{sel}/tasks/target/samples.zarr/zarr.json")
    shard_index = [subset.shards.index(storage.join(shards, r["shard"])) for r in manifest]
    assert subset.samples.pool_ids(shard_index, [r["key"] for r in manifest]).tolist() == [r["id"] for r in manifest]


def _target(root) -> str:
    """A two-class target of random pictures: what the bucket test needs is queries, not meaning."""
    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        for split, n in (("train", 3), ("val", 1)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([os.path.join(VENV_BIN, "sept"), *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sept {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc
