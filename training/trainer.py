"""The pre-training loop of one rank: DDP over the data stream, checkpoints, logs, the encoder.

``train(cfg)`` runs in the calling process as one rank of whatever job it is in (it joins the
process group through ``sept.training.distributed``), so the same function serves a laptop run,
a local multi-process run and a multi-node SLURM run. It never imports submitit or Ray.

Run directory (``cfg.out``): ``config.yaml``; ``checkpoint.pt``, written atomically every
``checkpoint_every`` steps, at the end, and when the scheduler signals (``preemption``); the
logs of ``sept.training.run_logs``; ``summary.json`` and ``encoder.pt`` at the end; and, for
DetCon on data without masks, ``masked-shards/`` (``sept.training.run_data``).

A checkpoint holds the model and optimizer, the step, every rank's position in the data
(``batching.EpochState``) and the list of attempts (each start or resume, with its SLURM job id
and restart count). A run that finds one resumes from its step at the same data position; the
learning rate and the progressive schedules are functions of the step, so they continue too.

Each step the ranks all-reduce two flags: a stop request (a signal, ``preemption``) and "my
data ran out" (bad samples can end a rank's epoch early). A stop checkpoints at that step and
returns ``{"interrupted": "SIGUSR2" | "SIGTERM", ...}`` without writing the encoder; running out
ends the epoch on every rank at the same step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sept.errors import SeptError
from sept.training import distributed
from sept.training.acceleration import AccelerationPlan
from sept.training.batching import EpochState, TrainBatch
from sept.training.checkpoint import Checkpointer
from sept.training.config import PretrainConfig, save_resolved_config
from sept.training.encoder import build_backbone
from sept.training.finalize import finalize_run
from sept.training.methods import build_method
from sept.training.optim import apply_learning_rate, make_optimizer
from sept.training.preemption import StopRequests, signal_of_code
from sept.training.run_data import open_stream
from sept.training.run_logs import RunLogs
from sept.training.schedule import global_batch_lr

log = logging.getLogger(__name__)


def _device(cfg: PretrainConfig, info: distributed.DistInfo) -> torch.device:
    """This rank's device: its GPU by local rank (SLURM_LOCALID under SLURM), or the CPU."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = info.local_rank
    if local >= visible:
        raise SeptError(
            f"rank {info.rank} (local rank {local} on {socket.gethostname()}) needs GPU {local},"
            f" but {visible} GPU(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r});"
            " run one task per GPU (tasks per node = GPUs per node)"
        )
    return torch.device("cuda", local)


def _share_cpu_threads(loading_processes: int = 0) -> None:
    """Compute threads of a CPU rank: SLURM's CPUs per task where set, else this node's cores
    shared among its ranks (ranks that each start a thread per core fight over them, and gloo
    collectives then wait on descheduled threads), less the rank's own loading processes (each
    keeps a core busy making batches)."""
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm_cpus and slurm_cpus.isdigit():
        torch.set_num_threads(max(1, int(slurm_cpus) - loading_processes))
        return
    ranks_here = distributed.get_local_world_size()
    if ranks_here > 1 or loading_processes:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // ranks_here - loading_processes))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the model runs under bfloat16 autocast: ``precision`` bf16, or auto on a GPU.

    On a CPU, auto stays float32 even where bfloat16 is native (AVX-512 BF16, AMX): there it was
    faster but moved what the demo experiment's arms learnt (benchmarks/RESULTS.md), and CPU runs
    are where experiments are compared against earlier float32 figures."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda"


def train(
    cfg: PretrainConfig,
    *,
    distributed_run: bool = True,
    encoder_path: str | None = None,
    encoder_extra: dict[str, Any] | None = None,
    step_callback: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Trains ``cfg.method`` for ``cfg.steps`` steps as one rank; returns the run summary (on every rank).

    ``distributed_run=False`` trains alone whatever the environment says (bootstrap).
    ``encoder_path`` defaults to ``run_dir/encoder.pt``; ``encoder_extra`` is added to its provenance.
    A run stopped by a signal returns ``{"interrupted": SIGNAL_NAME, "steps": ..., ...}``.
    ``step_callback(step, backbone)``, where given, runs on rank 0 after every optimizer step
    (the bootstrap scores checkpoints with it); the model is put back in training mode after it.
    """
    owns_group = distributed_run and not distributed.is_initialized()
    wants_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    info = distributed.init_distributed(wants_gpu) if distributed_run else distributed.DistInfo(0, 1, 0, None)
    threads = torch.get_num_threads()
    try:
        with StopRequests() as stop:
            return _train(cfg, info, encoder_path, encoder_extra or {}, stop, step_callback)
    finally:
        torch.set_num_threads(threads)  # a caller training in-process (experiment arms) gets its cores back
        if owns_group:
            distributed.destroy_distributed()


def _train(
    cfg: PretrainConfig,
    info: distributed.DistInfo,
    encoder_path: str | None,
    encoder_extra: dict,
    stop: StopRequests,
    step_callback: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    rank, world = info.rank, info.world_size
    is_main = rank == 0
    device = _device(cfg, info)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        _share_cpu_threads(1 if cfg.run_ahead and not cfg.num_workers else 0)
    collective_device = device if info.backend == "nccl" else torch.device("cpu")
    if not cfg.data:
        raise SeptError("no training data: set `data` to a shard spec")
    run_dir = os.path.abspath(cfg.out)
    os.makedirs(run_dir, exist_ok=True)
    if is_main:
        save_resolved_config(cfg, run_dir)

    # The peak rate of this run's global batch; the saved config keeps the rule, not the result.
    lr = global_batch_lr(cfg.lr, cfg.batch_size * world, cfg.lr_reference_batch)
    if lr != cfg.lr and is_main:
        log.info(
            "learning rate %.4g for a global batch of %d (%.4g given for %d)",
            lr,
            cfg.batch_size * world,
            cfg.lr,
            cfg.lr_reference_batch,
        )
    run_cfg = dataclasses.replace(cfg, lr=lr)
    plan = AccelerationPlan.from_config(run_cfg)
    stream, shards, pool_ids = open_stream(cfg, info, run_dir, plan, pin_memory=on_gpu)
    batches_per_epoch = stream.batches_per_epoch
    workers = stream.logical_workers()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
    backbone, feat_dim = build_backbone(cfg.arch, width=cfg.width)
    method = build_method(
        cfg.method,
        backbone,
        feat_dim,
        temperature=cfg.temperature,
        momentum=cfg.momentum,
        detcon_temperature=cfg.detcon_temperature,
    )
    # Channels-last convolutions are faster on CPUs (oneDNN) as on GPUs (tensor cores);
    # benchmarks/RESULTS.md has the figures.
    method = method.to(device).to(memory_format=torch.channels_last)
    if world > 1 and on_gpu:  # per-GPU batches are small: batch statistics over the global batch
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    optimizer = make_optimizer(method, run_cfg)
    bf16 = uses_bf16(cfg.precision, device)

    checkpoints = Checkpointer(run_dir, cfg, method, optimizer, rank, world)
    progress = checkpoints.resume(workers)
    start_step = progress.step

    model: nn.Module = method
    if world > 1:
        model = DistributedDataParallel(method, device_ids=[device.index] if on_gpu else None)
    if cfg.compile and on_gpu:
        model = torch.compile(model)
    logs = RunLogs(
        run_dir, rank, start_step, sample_log=cfg.sample_log, pool_ids=pool_ids, collective_device=collective_device
    )
    window = logs.window

    def run_step(batch: TrainBatch) -> torch.Tensor:
        inputs = [batch.view1, batch.view2]
        if batch.mask_ids is not None:
            inputs += [batch.mask1, batch.mask2, batch.mask_ids]
        inputs = [t.to(device, non_blocking=True) for t in inputs]
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        inputs[1] = inputs[1].contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(*inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    interrupted = None
    started = time.perf_counter()
    batches = stream.epoch(progress.epoch_state)
    fresh_epoch = progress.epoch_state.consumed == 0
    last_batch: TrainBatch | None = None
    model.train()
    try:
        while progress.step < cfg.steps:
            waited = time.perf_counter()
            batch = next(batches, None)
            window.wait += time.perf_counter() - waited
            stop_code, ran_out = distributed.all_reduce_max_flags([stop.code, 0 if batch is not None else 1])
            if stop_code:
                interrupted = signal_of_code(stop_code)
                log.warning("rank %d stops at step %d on %s", rank, progress.step, interrupted.name)
                checkpoints.save(progress)
                break
            if ran_out:
                epoch = progress.epoch_state.epoch
                if fresh_epoch:
                    raise SeptError(
                        f"no decodable training sample for rank {rank} of {world} in epoch {epoch}"
                        f" of {len(shards)} shards (first {shards[0]})"
                    )
                batches.close()
                log.info("epoch %d ended at step %d", epoch, progress.step)
                progress.epoch_state = EpochState.fresh(epoch + 1, progress.step, workers)
                batches, fresh_epoch = stream.epoch(progress.epoch_state), True
                continue
            fresh_epoch = False

            computing = time.perf_counter()
            lr = apply_learning_rate(optimizer, plan, progress.step)
            loss = run_step(batch)
            progress.step += 1
            step = progress.step
            method.momentum_update(step / cfg.steps)
            progress.epoch_state.advance(batch)
            stream.record(batch)
            last_batch = batch
            logs.trained(step, progress.epoch_state.epoch, batch.ids, batch.keys)

            if step == start_step + 1 or step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = distributed.all_reduce_mean(loss.detach().float().reshape(1).to(collective_device)).item()
                window.compute += time.perf_counter() - computing
                if not math.isfinite(mean_loss):
                    raise RuntimeError(f"training diverged: loss {mean_loss} at step {step} (lower lr?)")
                if step == 1:
                    progress.first_loss = mean_loss
                progress.last_loss = mean_loss
                image_size = int(batch.view1.shape[-1])
                strength = plan.strength_at(step - 1)
                logs.log_step(step, cfg.steps, progress.epoch_state.epoch, mean_loss, lr, image_size, strength)
            else:
                window.compute += time.perf_counter() - computing
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoints.save(progress)
            if step_callback is not None and is_main:
                step_callback(step, method.backbone)
                model.train()
    finally:
        batches.close()
        stream.close()
        logs.close()
    elapsed = time.perf_counter() - started
    window.reset()
    step = progress.step

    if interrupted is not None:
        return {"interrupted": interrupted.name, "steps": step, "resumed_from_step": start_step, "run_dir": run_dir}
    return finalize_run(
        cfg,
        run_dir=run_dir,
        rank=rank,
        world=world,
        backbone=method.backbone,
        progress=progress,
        start_step=start_step,
        rank_figures={"samples_read": stream.images_read, "bad_samples": stream.bad, **logs.rank_totals(elapsed)},
        encoder_path=encoder_path,
        encoder_extra=encoder_extra,
        device=device,
        collective_device=collective_device,
        details={
            "num_samples": stream.num_samples,
            "batches_per_epoch": batches_per_epoch,
            "epoch": progress.epoch_state.epoch,
            "final_lr": plan.lr(step - 1) if step > 0 else None,
            "final_image_size": int(last_batch.view1.shape[-1]) if last_batch is not None else None,
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round((step - start_step) * cfg.batch_size * world / max(elapsed, 1e-9), 1),
        },
    )
