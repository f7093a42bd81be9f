"""sept index: train the FAISS index once, then encode its shards in parallel as Ray tasks.

Training reads a bounded random sample of the embeddings. Each index shard owns a contiguous
range of pool shards and each encoding task reads only that range, writing its own group of
the index store. A rerun with the same embeddings and spec resumes at the missing shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import ray
from tqdm import tqdm

from sept.cluster.runtime import ray_session
from sept.errors import SeptError
from sept.index.codes import encode_shard, train_index
from sept.index.embedding_store import EmbeddingStore
from sept.index.spec import IndexSpec, choose_factory, make_index
from sept.index.store import IndexStore

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    embeddings: str
    out: str
    spec: IndexSpec = field(default_factory=IndexSpec)
    ray_address: str | None = None


def embeddings_fingerprint(emb: EmbeddingStore) -> str:
    """Identifies the embeddings an index was built from: encoder, pool listing, shard sizes."""
    h = hashlib.sha256()
    h.update(emb.encoder.identity.encode())
    for i, path in enumerate(emb.pool):
        h.update(f"{i}:{path}:{emb.shard_count(i)}\n".encode())
    return h.hexdigest()[:16]


@ray.remote(num_cpus=1)
def encode_index_shard(embeddings: str, index_path: str, index_shard: int, pool_shards: list[int]) -> int:
    import faiss

    faiss.omp_set_num_threads(1)
    emb = EmbeddingStore(embeddings)
    store = IndexStore(index_path)
    xs, idss = [], []
    for _, x, ids in emb.iter_shards(pool_shards):
        xs.append(x)
        idss.append(ids)
    x = np.concatenate(xs) if xs else np.zeros((0, emb.dim), np.float32)
    ids = np.concatenate(idss) if idss else np.zeros(0, np.int64)
    offsets, ids, codes = encode_shard(store.trained_index(), x, ids)
    store.write_shard(index_shard, offsets, ids, codes)
    return len(ids)


def build_index(cfg: IndexConfig) -> dict:
    emb = EmbeddingStore.open(cfg.embeddings)
    missing = emb.missing_shards()
    if missing:
        raise SeptError(
            f"{cfg.embeddings} has {len(missing)} incomplete shard(s), first {emb.pool[missing[0]]}; "
            "rerun `sept embed` to finish them"
        )
    spec = cfg.spec
    n, dim = emb.total_count(), emb.dim
    if n == 0:
        raise SeptError(f"{cfg.embeddings} holds no vectors")
    if spec.factory:
        factory, why = spec.factory, "given with --factory"
    else:
        factory, why = choose_factory(n, dim)
    metric = spec.faiss_metric()
    make_index(factory, dim, metric)  # fail fast on a bad factory string, before any work
    nshards = max(1, min(spec.shards, len(emb.pool)))
    assignment = [a.tolist() for a in np.array_split(np.arange(len(emb.pool)), nshards)]
    fingerprint = embeddings_fingerprint(emb)
    attrs = dict(
        spec=dict(spec.to_dict(), factory=factory, shards=nshards),
        factory_reason=why,
        dim=dim,
        metric=spec.metric,
        encoder=emb.encoder.to_dict(),
        embeddings=dict(path=emb.path, fingerprint=fingerprint),
        pool=emb.pool,
        assignment=assignment,
        ntotal=n,
        nprobe=spec.nprobe,
    )
    store = _open_or_create(cfg, attrs, factory, dim, metric, emb)
    log.info("index: %s (%s); %d vectors of dim %d in %d shard(s)", factory, why, n, dim, nshards)
    todo = [j for j in range(nshards) if not store.is_complete(j)]
    if todo:
        with ray_session(cfg.ray_address):
            refs = {encode_index_shard.remote(emb.path, store.path, j, assignment[j]): j for j in todo}
            with tqdm(total=len(todo), desc="index", unit="shard") as bar:
                pending = list(refs)
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done[0])
                    bar.update(1)
    encoded = sum(int(store.read_shard(j)[1].shape[0]) for j in range(nshards))
    if encoded != n:
        raise SeptError(f"index shards hold {encoded} vectors but the embeddings hold {n}; rerun `sept index`")
    store.update_attrs(complete=True)
    summary = dict(factory=factory, reason=why, ntotal=n, dim=dim, shards=nshards, path=store.path)
    with open(os.path.join(store.path, "config.json"), "w") as f:
        json.dump(dict(config=dict(embeddings=cfg.embeddings, out=cfg.out, spec=attrs["spec"]), summary=summary), f, indent=2)
    return summary


def _open_or_create(cfg: IndexConfig, attrs: dict, factory: str, dim: int, metric: int, emb: EmbeddingStore) -> IndexStore:
    if os.path.exists(os.path.join(cfg.out, "zarr.json")):
        store = IndexStore.open(cfg.out)
        old = store.attrs
        if old["embeddings"]["fingerprint"] != attrs["embeddings"]["fingerprint"] or old["spec"] != attrs["spec"]:
            raise SeptError(
                f"{cfg.out} already holds an index of other embeddings or another spec; "
                "choose another --out or delete it"
            )
        return store
    if os.path.exists(cfg.out) and os.listdir(cfg.out):
        raise SeptError(f"{cfg.out} exists and is not a sept index; choose another --out")
    index = make_index(factory, dim, metric)
    sample = emb.sample(cfg.spec.train_size, seed=cfg.spec.seed)
    if not index.is_trained and len(sample) < _min_train(index):
        raise SeptError(
            f"factory {factory!r} needs at least {_min_train(index)} training vectors; the embeddings hold {len(sample)}"
        )
    train_index(index, sample, seed=cfg.spec.seed)
    return IndexStore.create(cfg.out, trained=index, attrs=attrs)


def _min_train(index) -> int:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1
