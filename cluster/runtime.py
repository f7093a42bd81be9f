"""Connecting to Ray: a local instance by default, an existing cluster with --ray-address (or the
``RAY_ADDRESS`` environment variable, as Ray's own tools read it); and waiting on Ray tasks with
a deadline (``completed_with_deadline``), so a task stuck on a stalled read is retried, never
waited on forever.

Token authentication (Ray's default from 2.60 on) needs nothing here: Ray reads RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or its default token file itself, in the driver as in the cluster.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

from sept import storage
from sept.errors import SeptError

log = logging.getLogger(__name__)

LOCAL_NODE_IP = "127.0.0.2"


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None):
    """Use Ray for the duration of a stage; shut down only what this call started."""
    if ray.is_initialized():
        yield
        return
    # Workers open the same object-store URLs as the driver, so they get its credentials and endpoints.
    kwargs = dict(
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env={"env_vars": storage.forwarded_environment()},
    )
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray rewrites 127.0.0.1 to the host's public address; another loopback address keeps
        # a local instance's traffic on the loopback interface.
        if sys.platform.startswith("linux"):
            kwargs["_node_ip_address"] = os.environ.get("SEPT_RAY_NODE_IP", LOCAL_NODE_IP)
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log.info("ray: %d node(s), %s CPUs", len(nodes), ray.cluster_resources().get("CPU"))
    try:
        yield
    finally:
        ray.shutdown()


def completed_with_deadline(
    items: Iterable[Any],
    submit: Callable[[Any], ray.ObjectRef],
    *,
    timeout_s: float,
    attempts: int,
    describe: Callable[[Any], str],
) -> Iterator[tuple[Any, ray.ObjectRef]]:
    """Submit a Ray task per item; yield (item, finished ref) in the order they finish.

    A task with no result after ``timeout_s`` is cancelled (its worker killed) and submitted
    again, up to ``attempts`` tries in all; then a ``SeptError`` names the item. The caller
    ``ray.get``s each yielded ref, so task errors surface there, as with a plain ``ray.wait``.
    """
    inflight: dict = {}
    try:
        for item in items:
            inflight[submit(item)] = (item, 1, time.monotonic())
        yield from _until_done(inflight, submit, timeout_s, attempts, describe)
    finally:  # on an error (or the caller stopping early), no task is left running on its own
        for ref in inflight:
            ray.cancel(ref, force=True)


def _until_done(
    inflight: dict, submit, timeout_s: float, attempts: int, describe
) -> Iterator[tuple[Any, ray.ObjectRef]]:
    while inflight:
        oldest = min(t for _, _, t in inflight.values())
        wait = max(0.0, oldest + timeout_s - time.monotonic())
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=wait)
        if done:
            item, _, _ = inflight.pop(done[0])
            yield item, done[0]
            continue
        now = time.monotonic()
        for ref, (item, tries, t) in list(inflight.items()):
            if now - t < timeout_s:
                continue
            ray.cancel(ref, force=True)
            del inflight[ref]
            if tries >= attempts:
                raise SeptError(f"{describe(item)}: no result in {timeout_s:g}s, {tries} time(s); a stalled read?")
            log.warning("%s: no result in %gs; trying again (%d of %d)", describe(item), timeout_s, tries + 1, attempts)
            inflight[submit(item)] = (item, tries + 1, now)
