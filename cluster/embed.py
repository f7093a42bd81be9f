"""sept embed: Ray actors, each holding the encoder once, embed pool shards into the Zarr store.

The coordinator hands out shards one at a time from a queue. An actor that dies (or whose node
leaves the cluster) is replaced and its shard goes back on the queue; a shard that fails
``max_attempts`` times is reported by name and the run ends non-zero, every other shard embedded.
A shard with no result after ``shard_timeout_s`` (a read stalled on NFS or S3) counts as a failed
attempt: its actor is killed and replaced, and the shard goes to another one, so a hang never
stalls the run.
Vectors never travel through Ray: each actor writes its shard's group straight to the store
(atomically, see sept.index.embedding_store), and a retried shard that was already written is
dropped, so every sample is embedded exactly once. Bad samples are skipped and counted; more
than ``max_bad_fraction`` of them ends the run non-zero, with a quarantine report listing each.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from sept import storage
from sept.cluster.runtime import ray_session
from sept.data.decode import DEFAULT_MAX_PIXELS
from sept.data.embed_shard import BAD_KINDS
from sept.data.shards import list_shards
from sept.errors import SeptError, first_line, task_cause
from sept.index.embedding_store import EmbeddingStore, EncoderIdentity

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
SHARD_TIMEOUT_S = 1800.0  # far above a healthy shard's minutes; a stalled read is the only thing that waits this long


@dataclass
class EmbedConfig:
    pool: str = field(metadata={"help": "pool shards: brace pattern, directory or listing file"})
    encoder: str = field(metadata={"help": "sept encoder checkpoint or torchvision state dict"})
    out: str = field(metadata={"help": "embeddings store to write (EMB.zarr)"})
    ray_address: str | None = None
    workers: int = field(default=2, metadata={"help": "embedding actors"})
    batch_size: int = field(default=256, metadata={"help": "images per batch of an actor"})
    threads_per_worker: int = field(default=1, metadata={"help": "torch threads (and CPUs) per actor"})
    decode_threads: int = field(
        default=2, metadata={"help": "image decoding threads per actor, running beside the model"}
    )
    num_gpus_per_worker: float | None = field(
        default=None,
        metadata={
            "help": "GPUs each actor reserves (default: 1 if the Ray cluster has GPUs, else 0); "
            "a GPU requested but not usable is an error, never a silent CPU run"
        },
    )
    max_bad_fraction: float = field(
        default=0.01,
        metadata={
            "help": "end non-zero when more than this fraction of samples is bad (default: %(default)s); "
            "bad samples are listed in EMB.zarr/quarantine.jsonl"
        },
    )
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata={"help": "refuse images above this many pixels, before decoding them (decompression bombs)"},
    )
    max_attempts: int = field(
        default=MAX_ATTEMPTS,
        metadata={"help": "tries per shard before it is reported as failed (default: %(default)s)"},
    )
    shard_timeout_s: float = field(
        default=SHARD_TIMEOUT_S,
        metadata={
            "help": "seconds one shard may take before its actor counts as hung, is replaced, and the shard is "
            "tried elsewhere (default: %(default)s)"
        },
    )


@ray.remote(max_restarts=0)
class EmbedWorker:
    """One encoder, loaded once by ``setup``; embeds whole shards and writes them to the store."""

    def __init__(self, encoder_path: str, store_path: str, cfg: dict, device: str):
        self.encoder_path, self.store_path, self.cfg, self.device = encoder_path, store_path, cfg, device
        self.encoder = None

    def setup(self) -> dict:
        """Load the encoder on this actor's device and say where it runs (logged by the coordinator)."""
        import torch

        from sept.training.encoder import load_encoder

        host = socket.gethostname()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SeptError(
                f"--num-gpus-per-worker {self.cfg['num_gpus_per_worker']} but Ray node {host} has no usable "
                "CUDA device (torch.cuda.is_available() is False); pass --num-gpus-per-worker 0 for a CPU run"
            )
        torch.set_num_threads(int(self.cfg["threads_per_worker"]))
        self.encoder = load_encoder(self.encoder_path, device=self.device)
        self.store = EmbeddingStore(self.store_path)
        device = str(self.encoder.device)
        if self.device == "cuda":
            device += f" ({torch.cuda.get_device_name(self.encoder.device)})"
        return dict(
            pid=os.getpid(),
            host=host,
            node_id=ray.get_runtime_context().get_node_id(),
            device=device,
            torch_threads=torch.get_num_threads(),
            decode_threads=int(self.cfg["decode_threads"]),
        )

    def embed(self, shard_index: int, shard_path: str) -> dict:
        from sept.data.embed_shard import embed_shard

        if self.encoder is None:  # setup failed (the coordinator reports why); fail the same way
            self.setup()

        start = time.perf_counter()
        x, ids, hashes, report = embed_shard(
            self.encoder,
            shard_path,
            shard_index,
            batch_size=int(self.cfg["batch_size"]),
            decode_threads=int(self.cfg["decode_threads"]),
            max_pixels=int(self.cfg["max_pixels"]),
        )
        self.store.write_shard(shard_index, x, ids, report=report, hashes=hashes)
        return dict(
            shard=shard_index,
            embedded=len(ids),
            bad=report["bad"],
            seconds=time.perf_counter() - start,
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id(),
        )


def embed_pool(cfg: EmbedConfig) -> dict:
    """Embed every shard of the pool that the store does not hold yet. Returns a summary.

    Raises SeptError (after writing the summary and quarantine report) when a shard failed
    ``max_attempts`` times or more than ``max_bad_fraction`` of the samples are bad.
    """
    from sept.training.encoder import load_encoder

    # Ray workers may run in another working directory: hand them absolute paths.
    cfg = replace(cfg, encoder=storage.resolve(cfg.encoder), out=storage.resolve(cfg.out))
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise SeptError(f"--max-bad-fraction must lie in [0, 1], got {cfg.max_bad_fraction}")
    if cfg.workers < 1 or cfg.batch_size < 1:
        raise SeptError(f"--workers and --batch-size must be positive, got {cfg.workers} and {cfg.batch_size}")
    shards = list_shards(cfg.pool)
    encoder = load_encoder(cfg.encoder, device="cpu")
    store = EmbeddingStore.create_or_open(cfg.out, encoder=EncoderIdentity.of(encoder), pool=shards)
    del encoder
    store.remove_partial_writes()  # a worker killed mid-write leaves its temporary group behind
    todo = store.missing_shards()
    log.info("embed: %d shards in the pool, %d to embed", len(shards), len(todo))
    run = dict(reports=[], failed={}, workers=[], replaced=0, seconds=0.0, embed_seconds=0.0)
    if todo:
        with ray_session(cfg.ray_address):
            run = _EmbedRun(cfg, store, shards).run(todo)
        store.remove_partial_writes()
    summary = _summarize(store, cfg, run)
    store.set_attrs(last_run=summary, config=asdict(cfg))
    log.info("embed: %s", _describe(summary))
    problems = []
    if run["failed"]:
        names = ", ".join(f"{shards[i]} ({why})" for i, why in sorted(run["failed"].items()))
        problems.append(f"{len(run['failed'])} shard(s) failed {cfg.max_attempts} times and are not embedded: {names}")
    if summary["bad_fraction"] > cfg.max_bad_fraction:
        problems.append(
            f"{summary['bad_samples']} of {summary['samples']} samples are bad ({summary['bad_fraction']:.2%} > "
            f"--max-bad-fraction {cfg.max_bad_fraction:.2%}; {_kinds(summary['bad_kinds'])}); "
            f"they are listed in {summary['quarantine']}"
        )
    if problems:
        raise SeptError("; ".join(problems))
    return summary


class _EmbedRun:
    """The coordinator's queue: shards out to actors, results and failures back, actors replaced."""

    def __init__(self, cfg: EmbedConfig, store: EmbeddingStore, shards: list[str]):
        self.cfg, self.store, self.shards = cfg, store, shards
        self.num_gpus = _resolve_gpus(cfg.num_gpus_per_worker)
        self.device = "cuda" if self.num_gpus > 0 else "cpu"
        self.worker_cfg = dict(asdict(cfg), num_gpus_per_worker=self.num_gpus)
        self.workers: list[dict] = []
        self.replaced = 0
        self.first_ready: float | None = None  # when the first actor had its encoder loaded

    def _new_worker(self):
        return EmbedWorker.options(
            num_cpus=self.cfg.threads_per_worker, num_gpus=self.num_gpus, scheduling_strategy="SPREAD"
        ).remote(self.cfg.encoder, self.store.path, self.worker_cfg, self.device)

    def run(self, todo: list[int]) -> dict:
        """Embed the shards in todo; returns reports, failures and timings.

        A new actor gets its first shard at once, queued behind its ``setup`` (Ray runs an
        actor's calls in order), so no actor idles while another starts up.
        """
        start = time.perf_counter()
        n_workers = max(1, min(self.cfg.workers, len(todo)))
        queue = deque(todo)
        attempts = {i: 0 for i in todo}
        inflight: dict = {}  # ref -> (actor, shard); shard None for an actor's setup call
        started: dict = {}  # ref of a shard call -> when it was handed out
        idle: deque = deque()
        dead: set = set()  # actors already replaced (both their setup and shard calls fail)
        reports, failed = [], {}
        start_failures = 0

        def start_worker() -> None:
            actor = self._new_worker()
            inflight[actor.setup.remote()] = (actor, None)
            idle.append(actor)

        for _ in range(n_workers):
            start_worker()
        bar = tqdm(total=len(todo), desc="embed", unit="shard", dynamic_ncols=True)
        while queue or any(shard is not None for _, shard in inflight.values()):
            while queue and idle:
                shard = queue.popleft()
                actor = idle.popleft()
                attempts[shard] += 1
                ref = actor.embed.remote(shard, self.shards[shard])
                inflight[ref] = (actor, shard)
                started[ref] = time.monotonic()
            if not inflight:
                raise AssertionError("embed: shards queued but no worker running")
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=self._until_next_deadline(started))
            if not done:
                for ref in self._overdue(started):
                    actor, shard = inflight.pop(ref)
                    started.pop(ref)
                    why = f"no result in {self.cfg.shard_timeout_s:g}s (a stalled read?)"
                    log.warning("embed: shard %s: %s; replacing its worker", self.shards[shard], why)
                    self._retry_or_fail(shard, attempts, queue, failed, why)
                    dead.add(actor)
                    ray.kill(actor)
                    self.replaced += 1
                    start_worker()
                continue
            actor, shard = inflight.pop(done[0])
            started.pop(done[0], None)
            try:
                result = ray.get(done[0])
            except RayActorError as exc:  # the actor (or its node) died: replace it, retry its shard
                if shard is not None:
                    self._retry_or_fail(shard, attempts, queue, failed, "worker died")
                if actor in dead:
                    continue
                dead.add(actor)
                where = "while starting" if shard is None else f"on shard {self.shards[shard]}"
                log.warning("embed: worker died %s (%s); replacing it", where, first_line(exc, 200))
                if actor in idle:
                    idle.remove(actor)
                ray.kill(actor)
                self.replaced += 1
                if shard is None and not self.workers:
                    start_failures += 1
                    if start_failures > 3 * n_workers:
                        raise SeptError(f"embed: workers keep dying while starting: {first_line(exc, 200)}") from None
                start_worker()
                continue
            except RayTaskError as exc:
                cause = task_cause(exc)
                if shard is None:  # setup raised: a configuration problem no retry can fix
                    raise SeptError(first_line(cause)) from None
                why = first_line(cause, 200)
                log.warning("embed: shard %s failed (attempt %d): %s", self.shards[shard], attempts[shard], why)
                idle.append(actor)
                self._retry_or_fail(shard, attempts, queue, failed, why)
                continue
            if shard is None:
                if not self.workers:
                    self.first_ready = time.perf_counter()
                self.workers.append(result)
                log.info(
                    "embed: worker pid=%d on %s (node %s): device %s, %d torch thread(s), %d decode thread(s)",
                    result["pid"],
                    result["host"],
                    result["node_id"][:12],
                    result["device"],
                    result["torch_threads"],
                    result["decode_threads"],
                )
                continue
            idle.append(actor)
            reports.append(result)
            bar.update(1)
            elapsed = time.perf_counter() - (self.first_ready or start)
            bar.set_postfix(
                img_s=f"{sum(r['embedded'] for r in reports) / max(elapsed, 1e-9):.0f}",
                bad=sum(r["bad"] for r in reports),
            )
        bar.close()
        for actor in {id(a): a for a, _ in inflight.values()}.values():
            ray.kill(actor)
        for actor in idle:
            ray.kill(actor)
        end = time.perf_counter()
        return dict(
            reports=reports,
            failed=failed,
            workers=self.workers,
            replaced=self.replaced,
            seconds=end - start,
            embed_seconds=end - (self.first_ready or start),
        )

    def _until_next_deadline(self, started: dict) -> float:
        if not started:
            return self.cfg.shard_timeout_s
        return max(0.0, min(started.values()) + self.cfg.shard_timeout_s - time.monotonic())

    def _overdue(self, started: dict) -> list:
        now = time.monotonic()
        return [ref for ref, t in started.items() if now - t >= self.cfg.shard_timeout_s]

    def _retry_or_fail(self, shard: int, attempts: dict, queue: deque, failed: dict, why: str) -> None:
        if attempts[shard] < self.cfg.max_attempts:
            queue.append(shard)
        else:
            log.error("embed: shard %s failed %d times, giving up on it: %s", self.shards[shard], attempts[shard], why)
            failed[shard] = why


def _resolve_gpus(requested: float | None) -> float:
    available = float(ray.cluster_resources().get("GPU", 0))
    if requested is None:
        return 1.0 if available >= 1 else 0.0
    if requested < 0:
        raise SeptError(f"--num-gpus-per-worker must be >= 0, got {requested}")
    if requested > 0 and available < requested:
        raise SeptError(
            f"--num-gpus-per-worker {requested:g} but the Ray cluster has {available:g} GPU(s); "
            "pass --num-gpus-per-worker 0 for a CPU run"
        )
    return float(requested)


def _summarize(store: EmbeddingStore, cfg: EmbedConfig, run: dict) -> dict:
    quarantine = store.write_quarantine()
    reports = run["reports"]
    embedded_now = sum(r["embedded"] for r in reports)
    seconds, embed_seconds = run["seconds"], run["embed_seconds"]
    return dict(
        shards=len(store.pool),
        complete=len(store.complete_shards()),
        embedded_now=len(reports),
        vectors=store.total_count(),
        samples=quarantine["samples"],
        bad_samples=quarantine["bad"],
        bad_kinds=quarantine["kinds"],
        bad_fraction=quarantine["bad"] / max(1, quarantine["samples"]),
        quarantine=quarantine["path"],
        failed=len(run["failed"]),
        failed_shards=[store.pool[i] for i in sorted(run["failed"])],
        workers_replaced=run["replaced"],
        devices=sorted({w["device"] for w in run["workers"]}),
        nodes=sorted({r["node_id"] for r in reports}),
        seconds=round(seconds, 2),  # the whole run, actor start-up included
        # from the first actor ready to the last shard written: the steady-state rate
        images_per_second=round(embedded_now / embed_seconds, 1) if embed_seconds > 0 else 0.0,
    )


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{k} {kinds.get(k, 0)}" for k in BAD_KINDS)


def _describe(summary: dict) -> str:
    return (
        f"{summary['complete']}/{summary['shards']} shards complete, {summary['vectors']} vectors, "
        f"{summary['embedded_now']} shard(s) embedded now at {summary['images_per_second']} img/s; "
        f"bad samples {summary['bad_samples']} ({_kinds(summary['bad_kinds'])}); "
        f"workers replaced {summary['workers_replaced']}; failed shards {summary['failed']}"
    )
