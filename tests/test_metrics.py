"""``GET /metrics``: Prometheus text that moves with what the runner does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner, require_cgroups

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Touches 256 MiB under a 64 MiB limit: the kernel OOM-kills it.
HOG = ["python3", "-c", "b = b'x' * (256 << 20)"]


async def _scrape(runner: Runner) -> Samples:
    async with runner.http.get(f"{runner.base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _get(after, name, **labels) - _get(before, name, **labels)


async def _submit_rest(runner: Runner, task_id: str, command: list[str]) -> None:
    body = {"command": command, "memory_mb": 64, "cores": 0.5}
    status, reply = await runner.rest("POST", f"/api/v1/task/{task_id}", body)
    assert status == 200, reply


async def _submit_grpc(runner: Runner, task_id: str, command: list[str]) -> None:
    task = task_pb2.Task(command=command, memory_mb=64, cores=0.5)
    await runner.stub.SubmitTask(
        runner_pb2.SubmitTaskRequest(task_id=task_id, task=task)
    )


async def test_counters_move_with_five_tasks(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    require_cgroups()
    runner = await make_runner()
    before = await _scrape(runner)

    await _submit_rest(runner, "ok-1", ["true"])
    await _submit_rest(runner, "ok-2", ["true"])
    await _submit_grpc(runner, "ok-3", ["true"])
    await _submit_grpc(runner, "fails", ["false"])
    await _submit_rest(runner, "hog", HOG)
    finals = {}
    for task_id in ("ok-1", "ok-2", "ok-3", "fails", "hog"):
        finals[task_id] = (await runner.wait_rest(task_id))["state"]
    assert finals == {
        "ok-1": "SUCCEEDED",
        "ok-2": "SUCCEEDED",
        "ok-3": "SUCCEEDED",
        "fails": "FAILED",
        "hog": "OUT_OF_MEMORY",
    }
    with pytest.raises(grpc.aio.AioRpcError):
        await runner.stub.GetTask(runner_pb2.GetTaskRequest(task_id="nope"))
    after = await _scrape(runner)

    finished = "daggyr_tasks_finished_total"
    assert _moved(before, after, finished, state="SUCCEEDED") == 3
    assert _moved(before, after, finished, state="FAILED") == 1
    assert _moved(before, after, finished, state="OUT_OF_MEMORY") == 1
    assert _moved(before, after, finished, state="CANCELLED") == 0
    assert _moved(before, after, "daggyr_oom_killed_tasks_total") == 1
    assert _moved(before, after, "daggyr_task_queue_seconds_count") == 5
    assert _moved(before, after, "daggyr_task_run_seconds_count") == 5
    assert _get(after, "daggyr_tasks", state="SUCCEEDED") == 3
    assert _get(after, "daggyr_tasks", state="RUNNING") == 0

    requests = "daggyr_requests_total"
    rest, grpc_ = {"protocol": "rest"}, {"protocol": "grpc"}
    assert _moved(before, after, requests, **rest, rpc="SubmitTask", code="OK") == 3
    assert _moved(before, after, requests, **grpc_, rpc="SubmitTask", code="OK") == 2
    assert _moved(before, after, requests, **rest, rpc="GetTask", code="OK") == 5
    assert (
        _moved(before, after, requests, **grpc_, rpc="GetTask", code="NOT_FOUND") == 1
    )


async def test_capacity_gauges_follow_running_tasks(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    runner = await make_runner(capacity_overrides={"cores": 2, "memory_mb": 1000})
    await _submit_rest(runner, "sleeper", ["sleep", "60"])
    await _submit_rest(runner, "waiter", ["true"])  # fits: 1 of 2 cores used
    status, body = await runner.rest(
        "POST", "/api/v1/task/big", {"command": ["true"], "cores": 2, "memory_mb": 64}
    )
    assert status == 200 and body["state"] == "QUEUED"

    samples = await _scrape(runner)
    assert _get(samples, "daggyr_capacity_cores", kind="total") == 2
    assert _get(samples, "daggyr_capacity_cores", kind="free") <= 1.5
    assert _get(samples, "daggyr_capacity_memory_bytes", kind="total") == 1000 << 20
    assert _get(samples, "daggyr_queue_length") == 1
    assert _get(samples, "daggyr_tasks", state="QUEUED") == 1

    await runner.rest("POST", "/api/v1/task/sleeper:cancel", {})
    await runner.wait_rest("big")
    samples = await _scrape(runner)
    assert _get(samples, "daggyr_capacity_cores", kind="free") == 2
    assert _get(samples, "daggyr_capacity_memory_bytes", kind="free") == 1000 << 20
    assert _get(samples, "daggyr_queue_length") == 0
    assert _get(samples, "daggyr_tasks_finished_total", state="CANCELLED") == 1


async def test_each_runner_counts_only_its_own(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    busy, idle = await make_runner(), await make_runner()
    await _submit_rest(busy, "one", ["true"])
    await busy.wait_rest("one")
    busy_samples, idle_samples = await _scrape(busy), await _scrape(idle)
    finished = "daggyr_tasks_finished_total"
    assert _get(busy_samples, finished, state="SUCCEEDED") == 1
    assert _get(idle_samples, finished, state="SUCCEEDED") == 0
    assert _get(idle_samples, "daggyr_requests_total") == 0


async def test_metrics_is_not_an_api_request(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    runner = await make_runner()
    await _scrape(runner)
    samples = await _scrape(runner)
    assert not any(name == "daggyr_requests_total" for name, _ in samples)
