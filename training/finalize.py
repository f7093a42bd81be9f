"""The end of a finished run: its encoder file and its summary.

``write_encoder`` is how a run's backbone becomes ``encoder.pt`` (its arch, image size and the
ImageNet normalisation of the config, through ``sept.training.encoder.save_encoder``, the file
format's one home); the trainer and the bootstrap, which rewrites the trainer's encoder with the
weights it keeps and the feature centre, both write through it. ``finalize_run`` checks the
process group once more, gathers every rank's figures and, on rank 0, writes the encoder and
``summary.json``; every rank returns the summary.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from sept.io import atomic_write_text
from sept.training import distributed
from sept.training.checkpoint import TrainProgress
from sept.training.config import PretrainConfig
from sept.training.encoder import IMAGENET_MEAN, IMAGENET_STD, save_encoder

SUMMARY_FILENAME = "summary.json"
ENCODER_FILENAME = "encoder.pt"


def write_encoder(
    path: str, backbone: nn.Module, cfg: PretrainConfig, extra: dict[str, Any], center: np.ndarray | None = None
) -> str:
    """Writes ``backbone`` as the encoder of a run of ``cfg`` to ``path``, with provenance ``extra``
    and optionally a feature ``center``; returns ``path``."""
    return save_encoder(
        path,
        backbone,
        arch=cfg.arch,
        image_size=cfg.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        extra=extra,
        center=center,
    )


def finalize_run(
    cfg: PretrainConfig,
    *,
    run_dir: str,
    rank: int,
    world: int,
    backbone: nn.Module,
    progress: TrainProgress,
    start_step: int,
    rank_figures: dict[str, Any],
    encoder_path: str | None,
    encoder_extra: dict[str, Any],
    device: torch.device,
    collective_device: torch.device,
    details: dict[str, Any],
) -> dict[str, Any]:
    """Writes the encoder and summary.json (rank 0) and returns the summary on every rank.

    ``rank_figures`` is this rank's entry of the summary's ``ranks`` (its node, samples read and
    throughput); ``details`` are the summary fields only the trainer knows (data sizes, timing,
    final learning rate and image size)."""
    check = torch.tensor([float(rank + 1)], device=collective_device)
    allreduce_check = distributed.all_reduce_sum(check).item()
    ranks = distributed.gather_objects({**distributed.node_info(), **rank_figures})
    summary: dict[str, Any] | None = None
    if rank == 0:
        step = progress.step
        encoder_path = os.path.abspath(encoder_path or os.path.join(run_dir, ENCODER_FILENAME))
        extra = {
            "method": cfg.method,
            "steps": step,
            "data": cfg.data,
            "world_size": world,
            "final_loss": progress.last_loss,
            "seed": cfg.seed,
            **encoder_extra,
        }
        write_encoder(encoder_path, backbone, cfg, extra)
        summary = {
            "world_size": world,
            "steps": step,
            "resumed_from_step": start_step,
            "first_loss": progress.first_loss,
            "final_loss": progress.last_loss,
            "allreduce_check": int(allreduce_check) if float(allreduce_check).is_integer() else allreduce_check,
            "ranks": ranks,
            "method": cfg.method,
            "arch": cfg.arch,
            "batch_size_per_rank": cfg.batch_size,
            **details,
            "data_wait_s_max": max(r["data_wait_s"] for r in ranks),
            "device": str(device.type),
            "attempts": progress.history,
            "run_dir": run_dir,
            "encoder": encoder_path,
        }
        atomic_write_text(os.path.join(run_dir, SUMMARY_FILENAME), json.dumps(summary, indent=2) + "\n")
    summary = distributed.broadcast_object(summary)
    distributed.barrier()
    return summary
