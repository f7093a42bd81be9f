"""Process-group setup and collectives: the one module that reads RANK/WORLD_SIZE and SLURM variables.

Everything here degrades to a no-op in a single process (no process group), so losses, the
loader and the trainer call the same functions whether they run alone, under ``torchrun``-style
env:// variables, or as submitit tasks (local or SLURM). submitit is imported only when the
process was started by submitit.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_INIT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    """``gloo``/``nccl`` once a process group exists; None for a single process."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """The number of ranks (1 without a process group)."""
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    """This process's rank within its node (picks its GPU): LOCAL_RANK, else SLURM_LOCALID."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def get_local_world_size() -> int:
    """The number of ranks on this node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main_process() -> bool:
    return get_rank() == 0


def _under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def backend_for(use_gpu: bool) -> str:
    """NCCL only for ranks that train on a GPU; a CPU run on a GPU node still talks over gloo."""
    return "nccl" if use_gpu and torch.cuda.is_available() else "gloo"


def init_distributed(use_gpu: bool | None = None) -> DistInfo:
    """Joins the job's process group: gloo on CPU, nccl on GPU; nothing for a world of one.

    ``use_gpu``: whether this rank trains on a GPU (None: whenever CUDA is available).

    Under submitit the rank, world size and master address come from
    ``submitit.helpers.TorchDistributedEnvironment`` (exported as env:// variables); otherwise
    from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT if set. Idempotent.
    """
    if is_initialized():
        return DistInfo(get_rank(), get_world_size(), get_local_rank(), dist.get_backend())
    if _under_submitit():
        from submitit.helpers import TorchDistributedEnvironment

        # The task's own values win over whatever the submitting shell had exported. The GPU is
        # chosen from LOCAL_RANK by the trainer, so CUDA_VISIBLE_DEVICES is left to SLURM.
        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        log.info(
            "submitit task: rank %d/%d (local %d), master %s:%s",
            env.rank,
            env.world_size,
            env.local_rank,
            env.master_addr,
            env.master_port,
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistInfo(0, 1, 0, None)
    backend = backend_for(torch.cuda.is_available() if use_gpu is None else use_gpu)
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank() % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://", timeout=_INIT_TIMEOUT)
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), get_local_rank(), backend)


def destroy_distributed() -> None:
    global _CONTROL_GROUP
    if is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def node_info() -> dict:
    """Where this rank runs: hostname, SLURM node id and job id (None outside SLURM)."""
    return {
        "rank": get_rank(),
        "local_rank": get_local_rank(),
        "hostname": socket.gethostname(),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenates every rank's tensor; the backward pass returns to each rank the summed
    gradient of its own slice, so a loss over gathered negatives trains every rank's encoder."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, rank order, differentiable; the tensor
    itself without a process group. All ranks must pass the same shape."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 (no gradient); the tensor itself alone."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


_CONTROL_GROUP = None


def all_reduce_max_flags(values: list[int]) -> list[int]:
    """Element-wise max of small integer flags over all ranks (``values`` itself alone).

    Runs on CPU over a gloo group even when training uses NCCL, so reading the result does not
    wait for the GPU to finish the step in flight (a per-step control message must not stall
    the device pipeline)."""
    global _CONTROL_GROUP
    if not is_initialized() or dist.get_world_size() == 1:
        return list(values)
    group = None
    if dist.get_backend() != "gloo":
        if _CONTROL_GROUP is None:
            _CONTROL_GROUP = dist.new_group(backend="gloo")
        group = _CONTROL_GROUP
    flags = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in flags]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks (unchanged alone); returns the tensor."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean across ranks (unchanged alone); returns the tensor."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` alone)."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (``obj`` itself alone)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
