"""JobShape: the size and SLURM placement of a submitit job, one dataclass for every launch path.

``sept pretrain``, ``sept experiment`` and ``sept demo`` all hand their pre-training runs to
``sept.training.launcher``; each takes the same shape (nodes, ranks, GPUs, CPUs, memory, time
limit and the SLURM partition/account/qos/constraint), so the shape, its defaults and its help
live here once and the command line is generated from these fields (``sept.config_cli``). The
module imports nothing heavy, so a config that holds a JobShape stays cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sept.errors import SeptError

EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class JobShape:
    """A job of ``nodes`` x ``tasks_per_node`` ranks; on SLURM also its resources and placement."""

    nodes: int = field(default=1, metadata={"help": "nodes of the job (the local executor runs on one)"})
    gpus_per_node: int = field(default=0, metadata={"help": "GPUs per node, one rank each"})
    tasks_per_node: int | None = field(default=None, metadata={"help": "ranks per node (default: GPUs per node, or 1)"})
    cpus_per_task: int = field(default=1, metadata={"help": "SLURM CPUs per rank"})
    mem_gb: float | None = field(
        default=None, metadata={"help": "SLURM memory per node in GB (default: the partition's)"}
    )
    time_min: int = field(default=60, metadata={"flag": "--time", "help": "SLURM time limit in minutes"})
    partition: str | None = field(default=None, metadata={"help": "SLURM partition"})
    account: str | None = field(default=None, metadata={"help": "SLURM account"})
    qos: str | None = field(default=None, metadata={"help": "SLURM quality of service"})
    constraint: str | None = field(default=None, metadata={"help": "SLURM node constraint (features)"})

    def ranks_per_node(self, executor: str) -> int:
        """Checks the shape for ``executor``; returns the ranks per node (default: one per GPU, or 1)."""
        if executor not in EXECUTORS:
            raise SeptError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
        tasks = self.tasks_per_node
        if tasks is None:
            tasks = self.gpus_per_node if self.gpus_per_node > 0 else 1
        if self.nodes < 1 or tasks < 1:
            raise SeptError(
                f"need at least one node and one task per node, got nodes={self.nodes} tasks_per_node={tasks}"
            )
        if self.gpus_per_node > 0 and tasks != self.gpus_per_node:
            raise SeptError(
                f"one task per GPU: tasks per node ({tasks}) must equal GPUs per node ({self.gpus_per_node})"
            )
        if executor == "local" and self.nodes != 1:
            raise SeptError(f"the local executor runs on one node, got nodes={self.nodes}")
        return tasks
