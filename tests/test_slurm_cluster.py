"""Integration test: submitit + torch DDP (gloo) across the two-node dev SLURM cluster.

Needs the cluster from `bash slurm/dev-cluster.sh up` (node1, node2 in partition
`debug`); skips with the reason when sinfo is missing or the nodes are not up.
"""

import shutil
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.integration

PARTITION = "debug"
NODE_NAMES = ("node1", "node2")
JOB_DEADLINE_S = 180
# Printed by each task so the test can check where stdout lands.
STDOUT_MARKER = "sept-dev-ddp-task"

# The job runs `python -m submitit.core._submit` with sys.executable; this test module
# is not importable there (tests/ is not on its sys.path), so ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cluster_unavailable_reason() -> str | None:
    """Why the dev cluster cannot run the test, or None when both nodes are usable."""
    if shutil.which("sinfo") is None:
        return "sinfo not on PATH (no SLURM client); run `bash slurm/dev-cluster.sh up`"
    try:
        answer = subprocess.run(
            ["sinfo", "--noheader", "--Node", f"--partition={PARTITION}", "--format=%N %t"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not answering; run `bash slurm/dev-cluster.sh up`"
    if answer.returncode != 0:
        return f"sinfo failed ({answer.stderr.strip()}); run `bash slurm/dev-cluster.sh up`"
    states = dict(line.split() for line in answer.stdout.splitlines() if line.strip())
    usable = {"idle", "mix", "alloc", "comp"}
    not_usable = {name: states.get(name, "missing") for name in NODE_NAMES if states.get(name) not in usable}
    if not_usable:
        return f"dev cluster not up (nodes {not_usable}); run `bash slurm/dev-cluster.sh up`"
    return None


def _all_reduce_rank_plus_one() -> dict:
    """One DDP task: join a gloo group from SLURM's environment and all-reduce rank+1."""
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist_env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo")
    try:
        value = torch.tensor([float(dist_env.rank + 1)])
        dist.all_reduce(value)
        world_size = dist.get_world_size()
    finally:
        dist.destroy_process_group()
    print(f"{STDOUT_MARKER} rank={dist_env.rank} node={os.environ['SLURMD_NODENAME']}", flush=True)
    return {
        "rank": dist_env.rank,
        "world_size": world_size,
        "reduced": value.item(),
        "master_addr": dist_env.master_addr,
        "node_id": int(os.environ["SLURM_NODEID"]),
        "node_name": os.environ["SLURMD_NODENAME"],
    }


def _wait_or_cancel(job: submitit.Job, deadline_s: float) -> None:
    # Without accounting, sacct cannot report a state (submitit sees UNKNOWN forever),
    # so a job that dies without writing its result pickle would block job.results().
    deadline = time.monotonic() + deadline_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(
                f"job {job.job_id} not done after {deadline_s}s; stdout:\n{job.stdout()}\nstderr:\n{job.stderr()}"
            )
        time.sleep(1)


def test_submitit_ddp_all_reduce_spans_both_nodes(tmp_path):
    reason = _cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(
        slurm_partition=PARTITION,
        nodes=2,
        tasks_per_node=1,
        cpus_per_task=1,
        timeout_min=5,
        name="sept-dev-ddp-test",
    )
    job = executor.submit(_all_reduce_rank_plus_one)
    _wait_or_cancel(job, JOB_DEADLINE_S)
    results = sorted(job.results(), key=lambda result: result["rank"])

    assert [result["rank"] for result in results] == [0, 1]
    assert all(result["world_size"] == 2 for result in results)
    assert all(result["reduced"] == 3.0 for result in results)  # (0+1) + (1+1)
    assert all(result["master_addr"] == "node1" for result in results)
    assert [result["node_id"] for result in results] == [0, 1]
    assert [result["node_name"] for result in results] == list(NODE_NAMES)

    # Each task's stdout/stderr land in the submitit folder as <jobid>_<task>_log.{out,err}.
    for task_id, result in enumerate(results):
        stdout_path = tmp_path / f"{job.job_id}_{task_id}_log.out"
        assert stdout_path.is_file()
        assert f"{STDOUT_MARKER} rank={task_id} node={result['node_name']}" in stdout_path.read_text()
        assert (tmp_path / f"{job.job_id}_{task_id}_log.err").is_file()
