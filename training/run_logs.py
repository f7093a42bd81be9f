"""The run's CSV logs: rows keyed by optimizer step, appended as training goes.

* ``metrics.csv`` (rank 0): step, epoch, loss, lr, image_size, strength, images/s of the whole
  job, the slowest rank's images/s and the largest fraction of time a rank waited for data.
* ``rank_metrics.csv`` (rank 0, from every rank): step, rank, images/s, data-wait seconds,
  compute seconds of that rank over the logging window.
* ``samples-rank{r}.csv`` (each rank, ``sample_log``): step, epoch and the sample ids of the
  batch it trained on: the audit trail of "every sample once per epoch".

A resumed run first rewrites each log without the rows past its checkpoint's step, which the
interrupted run logged but will now redo (atomically, so a kill mid-rewrite loses nothing); a
row cut short by a kill is dropped the same way.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

from sept.io import atomic_write_text

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
SAMPLES_COLUMNS = ("step", "epoch", "ids")


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
