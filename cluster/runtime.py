"""Connecting to Ray: a local instance by default, an existing cluster with --ray-address (or the
``RAY_ADDRESS`` environment variable, as Ray's own tools read it).

Token authentication (Ray's default from 2.60 on) needs nothing here: Ray reads RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or its default token file itself, in the driver as in the cluster.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import ray

from sept import storage

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
