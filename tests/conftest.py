"""Shared fixtures: a real two-node Ray cluster on loopback, and the SLURM dev cluster's presence."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

VENV_BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout under test
RAY = os.path.join(VENV_BIN, "ray")
# Ray rewrites 127.0.0.1 to the host's public address; another loopback address stays on `lo`.
NODE_IP = "127.0.0.2"
# One token for the test cluster and every driver, this process included. Ray caches the token
# the first time it looks, so it is set before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))


@dataclass
class RayCluster:
    address: str
    env: dict  # environment for drivers: carries the auth token

    def run_sept(self, *args: str, check: bool = True, timeout: int = 1500) -> subprocess.CompletedProcess:
        return run_sept(*args, "--ray-address", self.address, env=self.env, check=check, timeout=timeout)


def run_sept(
    *args: str, env: dict | None = None, check: bool = True, timeout: int = 1500
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [os.path.join(VENV_BIN, "sept"), *args],
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"sept {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _free_port() -> int:
    """A free port below Ray's worker-port range (which starts at 10002), so runs don't collide."""
    import random

    for port in random.Random(os.getpid()).sample(range(6300, 9900), 200):
        with socket.socket() as s:
            try:
                s.bind((NODE_IP, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the Ray test cluster")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster (head + one worker node) with token auth, stopped afterwards."""
    env = dict(os.environ)
    temp_dir = tempfile.mkdtemp(prefix="sept-ray-", dir="/tmp")  # short: unix socket paths are limited
    port = _free_port()
    common = ["--num-cpus=2", "--disable-usage-stats", f"--node-ip-address={NODE_IP}"]
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            "--resources",
            '{"sept_head": 1}',
            *common,
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    cluster = RayCluster(address=f"{NODE_IP}:{port}", env=env)
    try:
        subprocess.run(
            [RAY, "start", f"--address={cluster.address}", "--resources", '{"sept_worker": 1}', *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        _wait_for_nodes(cluster, 2)
        yield cluster
    finally:
        stop_ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_ray_processes(temp_dir: str) -> None:
    """Stop the Ray processes whose command line names temp_dir: this cluster's, not anyone else's
    (`ray stop` would kill every Ray instance on the machine, other tests' and users' included)."""
    import signal

    def ours() -> list[int]:
        pids = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if temp_dir.encode() in f.read():
                            pids.append(int(pid))
                except OSError:
                    pass
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while ours() and time.time() < deadline:
            time.sleep(0.5)


def _wait_for_nodes(cluster: RayCluster, n: int, timeout: float = 60) -> None:
    code = (
        f"import ray; ray.init(address={cluster.address!r}, logging_level='ERROR'); "
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise RuntimeError(f"the Ray test cluster did not reach {n} nodes")


def slurm_available() -> str | None:
    """None when the dev SLURM cluster answers with two usable nodes, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: run `bash slurm/dev-cluster.sh up`"
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    usable = [n for n, s in states.items() if s.rstrip("*") in ("idle", "mix", "alloc", "comp")]
    if len(usable) < 2:
        return (
            f"SLURM dev cluster not up ({out.stdout.strip() or out.stderr.strip()}): run `bash slurm/dev-cluster.sh up`"
        )
    return None
