"""sept embed: Ray actors, each holding the encoder once, embed pool shards into the Zarr store.

The coordinator hands out shards one at a time from a queue. An actor that dies is replaced and
its shard goes back on the queue; a shard that fails three times is reported by name. Vectors
never travel through Ray: each actor writes its own shard group straight to the store.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from dataclasses import asdict, dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from sept.cluster.runtime import ray_session
from sept.data.shards import list_shards
from sept.errors import SeptError
from sept.index.embedding_store import EmbeddingStore, EncoderIdentity

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass
class EmbedConfig:
    pool: str
    encoder: str
    out: str
    ray_address: str | None = None
    workers: int = 2
    batch_size: int = 256
    threads_per_worker: int = 1


@ray.remote(num_cpus=1, max_restarts=0)
class EmbedWorker:
    def __init__(self, encoder_path: str, store_path: str, batch_size: int, threads: int):
        import torch

        from sept.training.encoder import load_encoder

        torch.set_num_threads(threads)
        self.encoder = load_encoder(encoder_path)
        self.store = EmbeddingStore(store_path)
        self.batch_size = batch_size

    def embed(self, shard_index: int, shard_path: str) -> dict:
        from sept.data.embed_shard import embed_shard

        x, ids, report = embed_shard(self.encoder, shard_path, shard_index, batch_size=self.batch_size)
        self.store.write_shard(shard_index, x, ids, report=report)
        return dict(report, shard=shard_index, embedded=len(ids), node=socket.gethostname(), pid=os.getpid(),
                    node_id=ray.get_runtime_context().get_node_id())


def embed_pool(cfg: EmbedConfig) -> dict:
    """Embed every shard of the pool that the store does not hold yet. Returns a summary."""
    from sept.training.encoder import load_encoder

    shards = list_shards(cfg.pool)
    encoder = load_encoder(cfg.encoder, device="cpu")
    store = EmbeddingStore.create_or_open(cfg.out, encoder=EncoderIdentity.of(encoder), pool=shards)
    del encoder
    todo = store.missing_shards()
    log.info("embed: %d shards in the pool, %d to embed", len(shards), len(todo))
    reports: list[dict] = []
    failed: dict[int, str] = {}
    if todo:
        with ray_session(cfg.ray_address):
            reports, failed = _run_queue(cfg, store, shards, todo)
    summary = _summarize(store, reports, failed)
    zarr_attrs = dict(last_run=summary, config=asdict(cfg))
    import zarr

    zarr.open_group(store.path, mode="r+").attrs.update(**zarr_attrs)
    if failed:
        names = ", ".join(f"{shards[i]} ({why})" for i, why in sorted(failed.items()))
        raise SeptError(f"{len(failed)} shard(s) failed {MAX_ATTEMPTS} times and are not embedded: {names}")
    return summary


def _run_queue(cfg: EmbedConfig, store: EmbeddingStore, shards: list[str], todo: list[int]):
    def new_worker():
        return EmbedWorker.options(scheduling_strategy="SPREAD").remote(
            cfg.encoder, store.path, cfg.batch_size, cfg.threads_per_worker
        )

    n_workers = max(1, min(cfg.workers, len(todo)))
    idle = deque(new_worker() for _ in range(n_workers))
    queue = deque(todo)
    attempts = {i: 0 for i in todo}
    inflight: dict = {}
    reports, failed = [], {}
    bar = tqdm(total=len(todo), desc="embed", unit="shard")
    while queue or inflight:
        while queue and idle:
            shard = queue.popleft()
            actor = idle.popleft()
            attempts[shard] += 1
            inflight[actor.embed.remote(shard, shards[shard])] = (actor, shard)
        done, _ = ray.wait(list(inflight), num_returns=1)
        ref = done[0]
        actor, shard = inflight.pop(ref)
        try:
            report = ray.get(ref)
        except RayActorError as exc:  # the actor (or its node) died: replace it, retry the shard
            log.warning("embed: worker died on shard %d (%s); replacing it", shard, type(exc).__name__)
            idle.append(new_worker())
            _retry_or_fail(shard, attempts, queue, failed, "worker died")
            continue
        except RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            log.warning("embed: shard %s failed: %s", shards[shard], cause)
            idle.append(actor)
            _retry_or_fail(shard, attempts, queue, failed, str(cause).splitlines()[0][:200])
            continue
        idle.append(actor)
        reports.append(report)
        bar.update(1)
        bar.set_postfix(bad=sum(r["bad"] for r in reports))
    bar.close()
    for actor in idle:
        ray.kill(actor)
    return reports, failed


def _retry_or_fail(shard: int, attempts: dict, queue: deque, failed: dict, why: str) -> None:
    if attempts[shard] < MAX_ATTEMPTS:
        queue.append(shard)
    else:
        failed[shard] = why


def _summarize(store: EmbeddingStore, reports: list[dict], failed: dict) -> dict:
    complete = store.complete_shards()
    bad = sum(store.shard_attrs(i).get("bad", 0) for i in complete)
    return dict(
        shards=len(store.pool),
        complete=len(complete),
        embedded_now=len(reports),
        vectors=store.total_count(),
        bad_samples=int(bad),
        failed=len(failed),
        nodes=sorted({r["node_id"] for r in reports}),
    )
