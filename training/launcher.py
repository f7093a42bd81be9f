"""Submitting pre-training as a submitit job: on this machine (local executor) or on SLURM.

The only module that imports submitit for training (after dinov2's ``run/submit.py``): a
picklable ``PretrainJob`` wraps the config; each task of the job runs ``trainer.train`` as one
rank. Many configs (seeds, arms, target tasks) go as one job array (``launch_pretrain_array``).
The job's size and SLURM placement is a ``JobShape`` (``sept.training.job_shape``).

Preemption and time limits. SLURM jobs are submitted with ``--requeue`` and
``--signal=USR2@signal_delay_s``. The trainer turns USR2 (the time-limit warning, or a
preemption notice) into a checkpoint at the next step boundary on every rank; then rank 0 of
``PretrainJob`` requeues the job through submitit (``scontrol requeue`` on SLURM, the requeue
exit code locally), and the new job resumes from that checkpoint at the same step, data
position and learning rate. SIGTERM (someone else requeues or cancels the job) checkpoints the
same way and just exits. A signal that arrives before training starts meets submitit's own
handler, which requeues ``PretrainJob`` as a ``Checkpointable``: it resumes from the last
periodic checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import submitit

from sept import storage
from sept.data.shards import list_shards
from sept.data.task_subset import is_task_data, open_task_data
from sept.errors import SeptError
from sept.training.config import PretrainConfig, save_resolved_config
from sept.training.job_shape import JobShape

log = logging.getLogger(__name__)

SUBMITIT_DIRNAME = "submitit"
SIGNAL_DELAY_S = 120
"""Seconds between SLURM's USR2 warning and the time limit: room to finish a step and checkpoint."""
_WAIT_FOR_REQUEUE_KILL_S = 120


class PretrainJob(submitit.helpers.Checkpointable):
    """The callable a submitit task runs: ``train(cfg)`` as one rank; requeued on USR2."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from sept.training.trainer import train  # imported in the task, not by the submitter

        summary = train(self.cfg)
        if summary.get("interrupted") == "SIGUSR2":
            self._requeue_and_exit(summary)
        if summary.get("interrupted"):
            log.warning("stopped at step %d on %s; checkpoint saved", summary["steps"], summary["interrupted"])
            sys.exit(143)  # no result pickle: the job is being requeued or cancelled by SLURM
        return summary

    def _requeue_and_exit(self, summary: dict[str, Any]) -> None:
        env = submitit.JobEnvironment()
        if env.global_rank == 0:
            log.warning("checkpointed at step %d on USR2: requeueing job %s", summary["steps"], env.job_id)
            env._requeue(0)  # scontrol requeue (SLURM) / the requeue exit code (local)
            sys.exit(-1)
        # The other ranks wait for the requeue to end them, so no task of the job looks failed
        # while rank 0 is still requeueing.
        time.sleep(_WAIT_FOR_REQUEUE_KILL_S)
        sys.exit(-1)


def _failure_reason(report: str) -> str:
    """The exception line of a failed task's traceback (submitit appends a '----' log footer)."""
    lines = [line.strip() for line in report.splitlines()]
    footers = [i for i, line in enumerate(lines) if line.startswith("-----")]
    if footers:
        lines = lines[: footers[-1]]
    lines = [line for line in lines if line]
    if not lines:
        return "no reason given"
    reason = lines[-1]
    prefix = f"{SeptError.__module__}.{SeptError.__name__}: "
    return reason[len(prefix) :] if reason.startswith(prefix) else reason


def _executor(
    executor: str, log_folder: str, shape: JobShape, *, tasks_per_node: int, signal_delay_s: int, name: str
) -> submitit.Executor:
    if executor == "local":
        submitter = submitit.LocalExecutor(folder=log_folder)
        submitter.update_parameters(
            timeout_min=shape.time_min,
            nodes=1,
            tasks_per_node=tasks_per_node,
            gpus_per_node=shape.gpus_per_node,
            signal_delay_s=signal_delay_s,
        )
        return submitter
    submitter = submitit.AutoExecutor(folder=log_folder, cluster="slurm")
    params: dict[str, Any] = dict(
        name=name,
        timeout_min=shape.time_min,
        nodes=shape.nodes,
        tasks_per_node=tasks_per_node,
        cpus_per_task=shape.cpus_per_task,
        slurm_signal_delay_s=signal_delay_s,
        slurm_additional_parameters={"requeue": True},  # clusters with JobRequeue=0 need it
    )
    optional = {
        "gpus_per_node": shape.gpus_per_node or None,  # no GPU request at all on clusters without GRES
        "slurm_partition": shape.partition,
        "slurm_account": shape.account,
        "slurm_qos": shape.qos,
        "slurm_constraint": shape.constraint,
        "mem_gb": shape.mem_gb,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    submitter.update_parameters(**params)
    return submitter


def _prepared(cfg: PretrainConfig, gpus_per_node: int, cpus_per_task: int = 1) -> PretrainConfig:
    # Tasks may start in another working directory (sbatch --chdir, requeues): absolute paths only.
    cfg = dataclasses.replace(cfg, out=os.path.abspath(cfg.out))
    if cfg.num_workers is None:  # the rank's own process trains; the other CPUs it is given load data
        cfg = dataclasses.replace(cfg, num_workers=max(0, cpus_per_task - 1))
    if gpus_per_node > 0 and cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device="cuda")  # a requested GPU that is missing is an error
    if not cfg.data:
        raise SeptError("no training data: set `data` to a shard spec")
    # Missing or changed data fails here, not minutes later inside the job.
    if is_task_data(cfg.data):
        open_task_data(cfg.data)
        cfg = dataclasses.replace(cfg, data=storage.resolve(cfg.data))
    else:
        list_shards(cfg.data)
    save_resolved_config(cfg, cfg.out)
    return cfg


def _results(job: submitit.Job, log_folder: str) -> dict[str, Any]:
    try:
        results = job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as err:
        raise SeptError(
            f"pre-training job {job.job_id} failed: {_failure_reason(str(err))} (logs in {log_folder})"
        ) from None
    return dict(results[0])


def launch_pretrain(
    cfg: PretrainConfig,
    *,
    executor: str = "local",
    shape: JobShape | None = None,
    signal_delay_s: int = SIGNAL_DELAY_S,
    wait: bool = True,
) -> dict[str, Any]:
    """Submits ``cfg`` as a job shaped by ``shape`` (default ``JobShape()``: one rank on one node).

    ``local`` runs the tasks as processes here (one node; DDP over localhost with gloo on CPU);
    ``slurm`` submits with sbatch. submitit's logs and pickles go to ``RUN_DIR/submitit/``.
    With ``wait`` returns rank 0's run summary plus ``job_id`` and ``log_folder``; without, just
    those two and ``run_dir``.
    """
    shape = shape or JobShape()
    tasks_per_node = shape.ranks_per_node(executor)
    cfg = _prepared(cfg, shape.gpus_per_node, shape.cpus_per_task)
    log_folder = os.path.join(cfg.out, SUBMITIT_DIRNAME)
    submitter = _executor(
        executor,
        log_folder,
        shape,
        tasks_per_node=tasks_per_node,
        signal_delay_s=signal_delay_s,
        name="sept-pretrain",
    )
    job = submitter.submit(PretrainJob(cfg))
    log.info(
        "submitted %s pre-training job %s (%d x %d ranks); logs in %s",
        executor,
        job.job_id,
        shape.nodes,
        tasks_per_node,
        log_folder,
    )
    info = {"job_id": str(job.job_id), "log_folder": log_folder, "run_dir": cfg.out}
    if not wait:
        return info
    summary = _results(job, log_folder)
    summary.update(info)
    return summary


def launch_pretrain_array(
    cfgs: Sequence[PretrainConfig],
    *,
    log_folder: str,
    executor: str = "local",
    shape: JobShape | None = None,
    signal_delay_s: int = SIGNAL_DELAY_S,
    wait: bool = True,
) -> list[dict[str, Any]]:
    """Submits every config of ``cfgs`` (each with its own ``out``) as one job array (one sbatch
    on SLURM), each task shaped like ``launch_pretrain``'s job; submitit's files go to
    ``log_folder``. Returns, in order, each run's summary (``wait``) or its job id and run dir."""
    if not cfgs:
        raise SeptError("no pre-training runs to submit")
    outs = [os.path.abspath(c.out) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise SeptError("every run of a job array needs its own out directory")
    shape = shape or JobShape()
    tasks_per_node = shape.ranks_per_node(executor)
    prepared = [_prepared(c, shape.gpus_per_node, shape.cpus_per_task) for c in cfgs]
    submitter = _executor(
        executor,
        log_folder,
        shape,
        tasks_per_node=tasks_per_node,
        signal_delay_s=signal_delay_s,
        name="sept-pretrain-array",
    )
    with submitter.batch():
        jobs = [submitter.submit(PretrainJob(c)) for c in prepared]
    log.info("submitted %d pre-training runs as one %s job array %s", len(jobs), executor, jobs[0].job_id.split("_")[0])
    infos = [{"job_id": str(j.job_id), "log_folder": log_folder, "run_dir": c.out} for j, c in zip(jobs, prepared)]
    if not wait:
        return infos
    return [{**_results(j, log_folder), **info} for j, info in zip(jobs, infos)]
