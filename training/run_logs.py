"""The run's CSV logs: rows keyed by optimizer step, appended as training goes.

* ``metrics.csv`` (rank 0): step, epoch, loss, lr, image_size, strength, images/s of the whole
  job, the slowest rank's images/s and the largest fraction of time a rank waited for data.
* ``rank_metrics.csv`` (rank 0, from every rank): step, rank, images/s, data-wait seconds,
  compute seconds of that rank over the logging window.
* ``samples-rank{r}.csv`` (each rank, ``sample_log``): step, epoch, the sample ids of the batch
  it trained on (the trainer's own numbering, by its shard list: the audit trail of "every
  sample once per epoch") and their pool ids (``sept.training.run_data.PoolIds``), which join
  the selection's ``manifest.jsonl`` and the pool's embeddings.

A resumed run first rewrites each log without the rows past its checkpoint's step, which the
interrupted run logged but will now redo (atomically, so a kill mid-rewrite loses nothing); a
row cut short by a kill is dropped the same way.

``RunLogs`` is the one object the trainer writes them through: it keeps this rank's throughput
window (images, data-wait and compute seconds since the last row), gathers every rank's window
at a log step, and writes the rows and the progress line on rank 0.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sept.io import atomic_write_text

if TYPE_CHECKING:  # run_data opens the loader; the logs need only its id translation
    from sept.training.run_data import PoolIds
from sept.training import distributed

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.csv"
METRICS_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "image_size",
    "strength",
    "imgs_per_s",
    "min_rank_imgs_per_s",
    "max_data_wait_frac",
)
RANK_METRICS_FILENAME = "rank_metrics.csv"
RANK_METRICS_COLUMNS = ("step", "rank", "imgs_per_s", "data_wait_s", "compute_s")
SAMPLES_COLUMNS = ("step", "epoch", "ids", "pool_ids")


def samples_filename(rank: int) -> str:
    return f"samples-rank{rank}.csv"


class StepCsv:
    """One CSV log whose first column is the step; keeps rows with step <= ``resume_step``."""

    def __init__(self, path: str, columns: Sequence[str], resume_step: int):
        self.path = path
        self.columns = tuple(columns)
        rows: list[list[str]] = []
        if resume_step > 0 and os.path.exists(path):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))[1:]
            rows = [r for r in rows if len(r) == len(self.columns) and r[0].isdigit() and int(r[0]) <= resume_step]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.columns)
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def append(self, row: Sequence) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"{self.path}: row of {len(row)} values for {len(self.columns)} columns")
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_step_csv(path: str) -> list[dict[str, str]]:
    """The rows of a log as dicts (column -> text)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class ThroughputWindow:
    """Images, data-wait and compute seconds of this rank since the last log row, and their totals."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.wait = 0.0
        self.compute = 0.0
        self.total_images = 0
        self.total_wait = 0.0
        self.total_compute = 0.0

    def vector(self) -> torch.Tensor:
        """float64 [images, wall seconds, data-wait seconds, compute seconds] of the window."""
        return torch.tensor(
            [self.images, time.perf_counter() - self.start, self.wait, self.compute], dtype=torch.float64
        )

    def reset(self) -> None:
        self.total_images += self.images
        self.total_wait += self.wait
        self.total_compute += self.compute
        self.start, self.images, self.wait, self.compute = time.perf_counter(), 0, 0.0, 0.0


class RunLogs:
    """The CSV logs of one rank of a run in ``run_dir`` (rank 0: metrics and rank metrics; every
    rank with ``sample_log``: its samples), kept to rows up to ``resume_step``."""

    def __init__(
        self,
        run_dir: str,
        rank: int,
        resume_step: int,
        *,
        sample_log: bool,
        pool_ids: PoolIds,
        collective_device: torch.device,
    ):
        self.is_main = rank == 0
        self.pool_ids = pool_ids
        self.collective_device = collective_device
        self.window = ThroughputWindow()
        self.metrics = (
            StepCsv(os.path.join(run_dir, METRICS_FILENAME), METRICS_COLUMNS, resume_step) if self.is_main else None
        )
        self.rank_metrics = (
            StepCsv(os.path.join(run_dir, RANK_METRICS_FILENAME), RANK_METRICS_COLUMNS, resume_step)
            if self.is_main
            else None
        )
        self.samples = (
            StepCsv(os.path.join(run_dir, samples_filename(rank)), SAMPLES_COLUMNS, resume_step) if sample_log else None
        )

    def trained(self, step: int, epoch: int, ids: torch.Tensor, keys: Sequence[str]) -> None:
        """Counts a batch of ``ids`` (sample ``keys``) trained on at ``step`` (and logs its samples
        with their pool ids, with ``sample_log``)."""
        if self.samples is not None:
            pool_ids = self.pool_ids.of(ids.cpu().numpy(), keys)
            self.samples.append(
                [step, epoch, " ".join(str(int(i)) for i in ids), " ".join(str(int(i)) for i in pool_ids)]
            )
        self.window.images += len(ids)

    def log_step(
        self, step: int, total_steps: int, epoch: int, loss: float, lr: float, image_size: int, strength: float
    ) -> None:
        """Gathers every rank's window (a collective: all ranks call it at the same step) and, on
        rank 0, writes one metrics.csv row, one rank_metrics.csv row per rank and the progress line."""
        per_rank = distributed.all_gather_no_grad(self.window.vector().to(self.collective_device)[None]).cpu()
        self.window.reset()
        if not self.is_main:
            return
        images, wall, wait, compute = (per_rank[:, i] for i in range(4))
        wall = wall.clamp_min(1e-9)
        rates = images / wall
        self.metrics.append(
            [
                step,
                epoch,
                f"{loss:.6f}",
                f"{lr:.6g}",
                image_size,
                f"{strength:.3f}",
                f"{float(images.sum() / wall.max()):.1f}",
                f"{float(rates.min()):.1f}",
                f"{float((wait / wall).max()):.3f}",
            ]
        )
        for r in range(per_rank.shape[0]):
            self.rank_metrics.append(
                [step, r, f"{float(rates[r]):.1f}", f"{float(wait[r]):.4f}", f"{float(compute[r]):.4f}"]
            )
        log.info(
            "step %d/%d loss %.4f lr %.4g %d px %.1f img/s",
            step,
            total_steps,
            loss,
            lr,
            image_size,
            float(per_rank[:, 0].sum() / per_rank[:, 1].max().clamp_min(1e-9)),
        )

    def rank_totals(self, elapsed: float) -> dict[str, float]:
        """This rank's throughput over the run (after ``window.reset()``), for the summary."""
        w = self.window
        return {
            "images_per_s": round(w.total_images / max(elapsed, 1e-9), 1),
            "data_wait_s": round(w.total_wait, 3),
            "compute_s": round(w.total_compute, 3),
        }

    def close(self) -> None:
        for csv_log in (self.metrics, self.rank_metrics, self.samples):
            if csv_log is not None:
                csv_log.close()
