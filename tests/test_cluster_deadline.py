"""Waiting on Ray tasks with a deadline, on the real two-node Ray cluster: a task that never
finishes is cancelled and tried again, then named; the others' results come through."""

from __future__ import annotations

import time

import pytest
import ray

from sept.cluster.runtime import completed_with_deadline
from sept.errors import SeptError

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0.1, max_retries=0)
def _sleep_then_return(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    ray.init(address=ray_cluster.address, logging_level="ERROR")
    yield ray_cluster
    ray.shutdown()


def test_tasks_within_the_deadline_all_come_back(ray_driver):
    got = [
        ray.get(ref)
        for _, ref in completed_with_deadline(
            [0.0, 0.5, 0.1], _sleep_then_return.remote, timeout_s=60, attempts=1, describe=str
        )
    ]
    assert sorted(got) == [0.0, 0.1, 0.5]


def test_a_stalled_task_is_retried_then_named(ray_driver, caplog):
    submitted: list[float] = []

    def submit(seconds: float):
        submitted.append(seconds)
        return _sleep_then_return.remote(seconds)

    got = []
    started = time.monotonic()
    with pytest.raises(SeptError, match=r"^stalled task: no result in 3s, 2 time\(s\)"):
        for _, ref in completed_with_deadline(
            [600.0, 0.2],
            submit,
            timeout_s=3,
            attempts=2,
            describe=lambda s: "stalled task" if s > 100 else "quick task",
        ):
            got.append(ray.get(ref))
    assert got == [0.2]  # the healthy task's result arrived while the stalled one was waited on
    assert submitted.count(600.0) == 2  # tried again once before it was named
    assert time.monotonic() - started < 60
    assert "stalled task: no result in 3s; trying again (2 of 2)" in caplog.text
