"""A run's checkpoint: what it holds, how it is written and how a run resumes from it.

``checkpoint.pt`` in the run directory holds the model and optimizer, the step, the first and
last logged loss, the resolved config, every rank's position in the data (``EpochState``) and the
list of attempts (each start or resume, with its SLURM job id and restart count). Rank 0 writes
it atomically (``sept.io.atomic_torch_save``), so a kill mid-write leaves the previous one.

A run that finds one resumes from its step at the same data position, unless the saved position
cannot be continued (another world size or worker count), in which case it starts the next
epoch. A checkpoint of a run with another config (beyond the fields a resume may change,
``RESUMABLE_CHANGES``) is refused rather than silently mixed in.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sept.errors import SeptError, first_line
from sept.io import atomic_torch_save
from sept.training import distributed
from sept.training.batching import EpochState
from sept.training.config import PretrainConfig, config_to_dict

log = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "checkpoint.pt"

RESUMABLE_CHANGES = (
    "out",
    "steps",
    "checkpoint_every",
    "log_every",
    "num_workers",
    "cache_mb",
    "run_ahead",
    "num_samples",
    "sample_log",
    "compile",
    "device",
)
"""Fields a run may change when it resumes; any other difference means another run's checkpoint."""


@dataclass
class TrainProgress:
    """How far a rank's run has come: what a checkpoint saves besides the weights."""

    epoch_state: EpochState
    step: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    history: list[dict] = field(default_factory=list)
    """The attempts (``attempt``) of the run, this one last."""


def attempt(step: int) -> dict[str, Any]:
    """This start of the run, for the checkpoint's history."""
    return {
        "start_step": step,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
        "hostname": socket.gethostname(),
        "time": round(time.time(), 3),
    }


def load_checkpoint(path: str, cfg: PretrainConfig, method: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The checkpoint's state, its model and optimizer loaded into ``method`` and ``optimizer``;
    SeptError if it is unreadable or belongs to a run with another config."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError) as err:
        reason = first_line(err)
        raise SeptError(f"cannot resume from checkpoint {path}: {reason} (remove it to start over)") from None
    saved = state.get("config") if isinstance(state, dict) else None
    if isinstance(saved, dict):
        current = config_to_dict(cfg)
        changed = [k for k in current if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current[k]]
        if changed:
            diff = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
            raise SeptError(
                f"checkpoint {path} belongs to a run with another config ({diff}); remove it or use another out dir"
            )
    try:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, EOFError) as err:
        reason = first_line(err)
        raise SeptError(f"cannot resume from checkpoint {path}: {reason} (remove it to start over)") from None
    return state


def resumed_epoch(state: dict, rank: int, world: int, workers: int, step: int) -> EpochState:
    """This rank's saved data position, or the start of the next epoch when the saved one cannot
    be continued (another world size or worker count: the shares would differ)."""
    positions = state.get("loader")
    saved = EpochState.from_dict(positions[rank]) if positions and len(positions) == world else None
    if saved is not None and saved.num_workers == workers:
        return saved
    epoch = EpochState.from_dict(positions[0]).epoch + 1 if positions else 0
    log.warning(
        "checkpoint data position is for %s ranks x %s workers, this run has %d x %d:"
        " continuing with epoch %d (the rest of the interrupted epoch is skipped)",
        len(positions or []) or "unknown",
        positions[0]["num_workers"] if positions else "?",
        world,
        workers,
        epoch,
    )
    return EpochState.fresh(epoch, step, workers)


class Checkpointer:
    """Resumes and saves one run's checkpoint (``run_dir/checkpoint.pt``) for rank ``rank`` of ``world``."""

    def __init__(
        self,
        run_dir: str,
        cfg: PretrainConfig,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        rank: int,
        world: int,
    ):
        self.path = os.path.join(run_dir, CHECKPOINT_FILENAME)
        self.cfg, self.method, self.optimizer = cfg, method, optimizer
        self.rank, self.world = rank, world

    def resume(self, workers: int) -> TrainProgress:
        """The checkpoint's progress (model and optimizer loaded), or a fresh start; either way
        with this attempt added to the history. Rank 0 decides for all whether there is one."""
        progress = TrainProgress(EpochState.fresh(0, 0, workers))
        if distributed.broadcast_object(os.path.exists(self.path)):
            if not os.path.exists(self.path):
                raise SeptError(
                    f"rank {self.rank} cannot see {self.path}, which rank 0 resumes from:"
                    " the run directory must be on a file system every node shares"
                )
            state = load_checkpoint(self.path, self.cfg, self.method, self.optimizer)
            step = int(state["step"])
            progress = TrainProgress(
                resumed_epoch(state, self.rank, self.world, workers, step),
                step,
                state.get("first_loss"),
                state.get("last_loss"),
                list(state.get("history") or []),
            )
            log.info(
                "rank %d resumes from %s at step %d (epoch %d, %d batches in)",
                self.rank,
                self.path,
                step,
                progress.epoch_state.epoch,
                progress.epoch_state.consumed,
            )
        progress.history.append(attempt(progress.step))
        return progress

    def save(self, progress: TrainProgress) -> None:
        """Gathers every rank's data position; rank 0 writes the checkpoint; all wait for it."""
        positions = distributed.gather_objects(progress.epoch_state.to_dict())
        if self.rank == 0:
            atomic_torch_save(
                {
                    "step": progress.step,
                    "model": self.method.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "first_loss": progress.first_loss,
                    "last_loss": progress.last_loss,
                    "config": config_to_dict(self.cfg),
                    "world_size": self.world,
                    "loader": positions,
                    "history": progress.history,
                },
                self.path,
            )
        distributed.barrier()
