"""sept embed under faults, on real two-node Ray clusters, through the command line.

- an embed actor SIGKILLed mid-shard is replaced and its shard redone;
- the second node of a two-node cluster killed mid-run costs only its shards in flight;
- a shard that fails three times is named, the run ends non-zero, every other shard is embedded;
- a shard whose read stalls (an HTTP object server that never sends the body) times out, is tried
  on a fresh actor, and is then named; the run ends instead of hanging;
- bad samples (one of each kind) are counted, listed in the quarantine report and budgeted.
Each run then checks that every decodable sample is in the store exactly once, and re-embeds a
few random ids to compare them with the stored vectors.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from conftest import NODE_IP, RAY, VENV_BIN, RayCluster, _wait_for_nodes
from test_embed_pools import (
    BAD_IN_SHARD,
    write_bad_kinds_shard,
    write_good_shard,
    write_non_adjacent_shard,
    write_truncated_shard,
)

from sept.data.decode import decode_sample
from sept.data.embed_shard import BAD_KINDS
from sept.data.identity import make_ids, split_ids
from sept.data.samples import ShardStats, iter_samples
from sept.index.embedding_store import EmbeddingStore
from sept.io import is_staging_name
from sept.training.encoder import build_backbone, load_encoder, save_encoder

pytestmark = pytest.mark.integration

BUSY_TITLE = b"ray::EmbedWorker.embed"


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_small", width=8)
    path = str(tmp_path_factory.mktemp("encoder") / "enc.pt")
    # 48 px input makes a shard take long enough for a kill to land while it is being embedded
    save_encoder(path, backbone, arch="resnet18_small", image_size=48, mean=(0.5,) * 3, std=(0.25,) * 3)
    return path


def _good_pool(root, shards: int, per_shard: int) -> list[str]:
    paths = []
    for s in range(shards):
        path = str(root / f"pool-{s}.tar")  # unpadded names: ids come from the listing, not the name
        write_good_shard(path, per_shard, seed=s)
        paths.append(path)
    return paths


def _listing(root, paths: list[str], name: str = "pool.txt") -> str:
    listing = root / name
    listing.write_text("\n".join(paths) + "\n")
    return str(listing)


class SeptProcess:
    """`sept embed` running in the background, its stderr read line by line as it comes."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(
            [os.path.join(VENV_BIN, "sept"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.extend(part for part in line.split("\r") if part.strip())

    def worker_pids(self) -> list[int]:
        return [int(m.group(1)) for line in list(self.lines) if (m := re.search(r"worker pid=(\d+)", line))]

    def wait(self, timeout: float = 300) -> tuple[int, str, str]:
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, out, "\n".join(self.lines)


def _is_busy(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(BUSY_TITLE)
    except OSError:
        return False


def _wait_until(predicate, timeout: float, what: str, run: SeptProcess):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if run.proc.poll() is not None:
            break
        time.sleep(0.02)
    run.proc.kill()
    _, out, err = run.wait()
    raise AssertionError(f"never saw {what}:\n{out[-2000:]}\n{err[-4000:]}")


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def _assert_every_sample_embedded_once(store_path: str, pool: list[str]) -> np.ndarray:
    """The store holds exactly the decodable samples of every pool shard, each once; returns the ids."""
    store = EmbeddingStore.open(store_path)
    _, ids = store.read_all()
    expected = []
    for i, shard in enumerate(pool):
        stats = ShardStats()
        expected.extend(
            make_ids(
                i, [s.position for s in iter_samples(shard, stats) if decode_sample(s, ShardStats()) is not None]
            ).tolist()
        )
    assert len(ids) == len(np.unique(ids)), "a sample was embedded twice"
    assert sorted(ids.tolist()) == sorted(expected)
    assert not [n for n in os.listdir(os.path.join(store_path, "shards")) if is_staging_name(n)]
    return ids


def _assert_reembedding_matches(store_path: str, encoder_path: str, pool: list[str], n: int = 5) -> None:
    """Random stored ids, re-embedded from their tar here, give the stored vectors back."""
    store = EmbeddingStore.open(store_path)
    x, ids = store.read_all()
    encoder = load_encoder(encoder_path, device="cpu")
    rng = np.random.default_rng(0)
    for row in rng.choice(len(ids), size=min(n, len(ids)), replace=False):
        shard, position = (int(v[0]) for v in split_ids(ids[row : row + 1]))
        sample = next(s for s in iter_samples(pool[shard]) if s.position == position)
        image = decode_sample(sample, ShardStats())
        fresh = encoder.embed(encoder.preprocess(image)[None])[0]
        np.testing.assert_allclose(x[row], fresh, atol=2e-3)  # stored as float16


# ---- an actor killed mid-shard -------------------------------------------------------------


def test_killed_actor_is_replaced_and_every_sample_embedded_once(ray_cluster, encoder_path, tmp_path):
    pool = _good_pool(tmp_path, shards=8, per_shard=40)
    out = str(tmp_path / "emb.zarr")
    run = SeptProcess(
        [
            "embed",
            "--pool",
            _listing(tmp_path, pool),
            "--encoder",
            encoder_path,
            "--out",
            out,
            "--workers",
            "2",
            "--batch-size",
            "8",
            "--ray-address",
            ray_cluster.address,
        ],
        ray_cluster.env,
    )
    victim = _wait_until(
        lambda: next((p for p in run.worker_pids() if _is_busy(p)), None), 240, "an embed actor at work", run
    )
    os.kill(victim, signal.SIGKILL)
    rc, stdout, stderr = run.wait()
    assert rc == 0, stderr[-4000:]
    summary = _summary(stdout)
    assert summary["workers_replaced"] >= 1 and "worker died" in stderr
    assert summary["complete"] == summary["shards"] == len(pool)
    _assert_every_sample_embedded_once(out, pool)
    _assert_reembedding_matches(out, encoder_path, pool)


# ---- bad samples and a shard that always fails --------------------------------------------


def test_failing_shard_is_named_and_bad_samples_are_counted_and_budgeted(ray_cluster, encoder_path, tmp_path):
    good = _good_pool(tmp_path, shards=1, per_shard=20)
    kinds, trunc, split = (str(tmp_path / n) for n in ("kinds.tar", "trunc.tar", "split.tar"))
    write_bad_kinds_shard(kinds)
    write_truncated_shard(trunc)
    write_non_adjacent_shard(split)
    pool = [*good, kinds, trunc, split]
    out = str(tmp_path / "emb.zarr")
    proc = ray_cluster.run_sept(
        "embed",
        "--pool",
        _listing(tmp_path, pool),
        "--encoder",
        encoder_path,
        "--out",
        out,
        "--workers",
        "2",
        "--batch-size",
        "4",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert "split.tar" in errors[0] and "split_key" in errors[0] and "failed 3 times" in errors[0]
    assert "--max-bad-fraction" in errors[0]  # 5 bad of 31 samples is far over the 1% default
    store = EmbeddingStore.open(out)
    assert store.missing_shards() == [3]
    _assert_every_sample_embedded_once(out, pool[:3])
    with open(os.path.join(out, "quarantine.jsonl")) as f:
        quarantined = [json.loads(line) for line in f]
    planted = dict(BAD_IN_SHARD)
    assert {(q["shard"], q["key"], q["kind"]) for q in quarantined if q["shard"] == kinds} == {
        (kinds, key, kind) for key, kind in planted.items()
    }
    assert [(q["shard"], q["kind"]) for q in quarantined if q["shard"] != kinds] == [(trunc, "truncated")]
    last_run = store.attrs["last_run"]
    assert last_run["bad_kinds"] == {kind: 1 for kind in BAD_KINDS}
    assert last_run["failed_shards"] == [split]

    # the same samples within a budget that allows them: the run succeeds and prints the counts
    ok_out = str(tmp_path / "ok.zarr")
    proc = ray_cluster.run_sept(
        "embed",
        "--pool",
        _listing(tmp_path, pool[:3], "ok.txt"),
        "--encoder",
        encoder_path,
        "--out",
        ok_out,
        "--workers",
        "1",
        "--max-bad-fraction",
        "0.2",
    )
    summary = _summary(proc.stdout)
    assert summary["bad_kinds"] == {kind: 1 for kind in BAD_KINDS}
    assert (summary["bad_samples"], summary["vectors"], summary["samples"]) == (5, 20 + 3 + 3, 31)


class StallingServer:
    """An HTTP object server on loopback that names a shard's size but never sends its bytes."""

    def __init__(self):
        import http.server

        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", "10240")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                self.do_HEAD()
                release.wait(120)  # the stalled read: headers sent, the body never comes

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stall.tar"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_stalled_read_is_retried_elsewhere_then_named_and_never_hangs(ray_cluster, encoder_path, tmp_path):
    good = _good_pool(tmp_path, shards=2, per_shard=6)
    server = StallingServer()
    try:
        pool = [good[0], server.url, good[1]]
        out = str(tmp_path / "emb.zarr")
        started = time.monotonic()
        proc = ray_cluster.run_sept(
            "embed",
            "--pool",
            _listing(tmp_path, pool),
            "--encoder",
            encoder_path,
            "--out",
            out,
            "--workers",
            "2",
            "--max-attempts",
            "2",
            "--shard-timeout-s",
            "8",
            check=False,
        )
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and server.url in errors[0] and "failed 2 times" in errors[0], proc.stderr[-4000:]
    assert "no result in 8s" in errors[0]
    assert proc.stderr.count("replacing its worker") == 2
    assert EmbeddingStore.open(out).missing_shards() == [1]
    _, ids = EmbeddingStore.open(out).read_all()
    assert sorted(ids.tolist()) == sorted([*make_ids(0, range(6)).tolist(), *make_ids(2, range(6)).tolist()])
    assert elapsed < 240  # two 8 s timeouts and two actor starts, not the stall's 120 s per try


def test_gpu_requested_on_a_cpu_cluster_is_an_error(ray_cluster, encoder_path, tmp_path):
    pool = _good_pool(tmp_path, shards=1, per_shard=2)
    proc = ray_cluster.run_sept(
        "embed",
        "--pool",
        pool[0],
        "--encoder",
        encoder_path,
        "--out",
        str(tmp_path / "emb.zarr"),
        "--num-gpus-per-worker",
        "1",
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "--num-gpus-per-worker 1" in errors[0] and "0 GPU" in errors[0]


# ---- the second node of a two-node cluster, killed mid-run ---------------------------------


class OwnTwoNodeCluster(RayCluster):
    """A head and a worker node started by this module, each process tagged so it can be killed."""

    def __init__(self):
        self.tag = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="sept-rk-", dir="/tmp")
        self.spill_dir = os.path.join(self.temp_dir, "spill")
        env = dict(os.environ)
        env["RAY_AUTH_TOKEN"] = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16)
        super().__init__(address=f"{NODE_IP}:{_free_port()}", env=env)

    def node_env(self, node: str) -> dict:
        env = dict(self.env, SEPT_TEST_RAY_NODE=f"{self.tag}-{node}")
        # a killed node is declared dead within ~2 s instead of Ray's default ~15 s
        env.update(
            RAY_health_check_period_ms="500",
            RAY_health_check_failure_threshold="3",
            RAY_health_check_initial_delay_ms="0",
        )
        return env

    def start(self) -> None:
        common = ["--num-cpus=2", "--disable-usage-stats", f"--node-ip-address={NODE_IP}"]
        port = self.address.rsplit(":", 1)[1]
        # a 512 MiB object store, spilling to a directory of its own: vectors never go through Ray,
        # so nothing may ever be spilled there
        spill = json.dumps({"type": "filesystem", "params": {"directory_path": self.spill_dir}})
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                f"--ray-client-server-port={_free_port()}",
                f"--object-store-memory={512 * 1024**2}",
                "--system-config",
                json.dumps({"object_spilling_config": spill}),
                *common,
            ],
            env=self.node_env("head"),
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [RAY, "start", f"--address={self.address}", *common],
            env=self.node_env("worker"),
            check=True,
            capture_output=True,
            timeout=180,
        )
        _wait_for_nodes(self, 2, timeout=120)

    def pids(self, node: str) -> list[int]:
        marker = f"SEPT_TEST_RAY_NODE={self.tag}-{node}".encode()
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/environ", "rb") as f:
                        if marker in f.read().split(b"\0"):
                            found.append(int(name))
                except OSError:
                    continue
        return found

    def kill(self, node: str) -> int:
        pids = self.pids(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def stop(self) -> None:
        self.kill("worker")
        self.kill("head")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


@pytest.fixture
def doomed_cluster():
    cluster = OwnTwoNodeCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_killed_node_costs_only_its_shards_in_flight(doomed_cluster, encoder_path, tmp_path):
    pool = _good_pool(tmp_path, shards=8, per_shard=40)
    out = str(tmp_path / "emb.zarr")
    run = SeptProcess(
        [
            "embed",
            "--pool",
            _listing(tmp_path, pool),
            "--encoder",
            encoder_path,
            "--out",
            out,
            "--workers",
            "2",
            "--batch-size",
            "8",
            "--ray-address",
            doomed_cluster.address,
        ],
        doomed_cluster.env,
    )
    _wait_until(
        lambda: any(_is_busy(p) for p in doomed_cluster.pids("worker")),
        240,
        "an embed actor at work on the second node",
        run,
    )
    assert doomed_cluster.kill("worker") > 0
    rc, stdout, stderr = run.wait()
    assert rc == 0, stderr[-4000:]
    summary = _summary(stdout)
    assert summary["workers_replaced"] >= 1, stderr[-3000:]
    assert summary["complete"] == len(pool)
    _assert_every_sample_embedded_once(out, pool)
    _assert_reembedding_matches(out, encoder_path, pool, n=3)
    spilled = [f for _, _, files in os.walk(doomed_cluster.spill_dir) for f in files]
    assert not spilled, f"objects spilled from the 512 MiB object store: {spilled[:5]}"
