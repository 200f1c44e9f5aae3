"""The main job end to end over both protocols: submit, poll, cancel, errors."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from daggyr.rest import routes_for
from daggyr.rpcs import rpcs
from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner
from .process_helpers import alive

SHELL = ["sh", "-c", "echo out; echo err >&2; exit 3"]


def _seconds(stamp: str) -> float:
    from google.protobuf import timestamp_pb2

    value = timestamp_pb2.Timestamp()
    value.FromJsonString(stamp)
    return value.ToNanoseconds() / 1e9


async def test_rest_submit_and_poll(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/rest-1", {"command": SHELL, "memory_mb": 64}
    )
    assert status == 200, body
    assert body["state"] in ("QUEUED", "RUNNING")
    assert body["task_id"] == "rest-1"

    final = await runner.wait_rest("rest-1")
    assert final["state"] == "FAILED"
    assert final["exit_code"] == 3
    assert final["output_log"] == "out\n"
    assert final["error_log"] == "err\n"
    assert _seconds(final["stop_time"]) > _seconds(final["start_time"])
    assert "memory_mb" in final["task"]  # proto field names, not camelCase


async def test_grpc_submit_and_poll(runner: Runner) -> None:
    task = task_pb2.Task(command=SHELL, memory_mb=64)
    first = await runner.stub.SubmitTask(
        runner_pb2.SubmitTaskRequest(task_id="grpc-1", task=task)
    )
    assert first.state in (task_pb2.QUEUED, task_pb2.RUNNING)
    final = await runner.stub.GetTask(
        runner_pb2.GetTaskRequest(task_id="grpc-1", wait_seconds=30)
    )
    assert final.state == task_pb2.FAILED
    assert final.exit_code == 3
    assert final.output_log == "out\n"
    assert final.error_log == "err\n"
    assert final.stop_time.ToNanoseconds() > final.start_time.ToNanoseconds()


async def test_cancel_kills_the_process(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/sleeper", {"command": ["sleep", "100"]}
    )
    assert status == 200
    await asyncio.sleep(0.3)
    pid = int(body["executor_log"].split("started pid ")[1].split()[0])
    assert alive(pid)

    started = time.monotonic()
    status, final = await runner.rest("POST", "/api/v1/task/sleeper:cancel", {})
    assert status == 200, final
    assert final["state"] == "CANCELLED"
    assert time.monotonic() - started < 2
    assert not alive(pid)


async def test_grpc_cancel(runner: Runner) -> None:
    await runner.stub.SubmitTask(
        runner_pb2.SubmitTaskRequest(
            task_id="g-sleep", task=task_pb2.Task(command=["sleep", "100"])
        )
    )
    final = await runner.stub.CancelTask(
        runner_pb2.CancelTaskRequest(task_id="g-sleep")
    )
    assert final.state == task_pb2.CANCELLED


async def test_missing_binary_is_system_error(runner: Runner) -> None:
    status, _ = await runner.rest(
        "POST", "/api/v1/task/nobin", {"command": ["/no/such/binary"]}
    )
    assert status == 200
    final = await runner.wait_rest("nobin")
    assert final["state"] == "SYSTEM_ERROR"
    assert "/no/such/binary not found" in final["executor_log"]
    assert "exit_code" not in final
    status, capacity = await runner.rest("GET", "/api/v1/capacity")
    assert status == 200
    assert capacity["free"] == capacity["total"]


async def test_submission_is_idempotent(runner: Runner) -> None:
    task = {"command": ["sleep", "5"], "memory_mb": 64}
    _, first = await runner.rest("POST", "/api/v1/task/same", task)
    status, again = await runner.rest("POST", "/api/v1/task/same", task)
    assert status == 200
    assert again["submit_time"] == first["submit_time"]

    status, body = await runner.rest(
        "POST", "/api/v1/task/same", {"command": ["sleep", "6"], "memory_mb": 64}
    )
    assert status == 409
    assert body["code"] == 6
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runner.stub.SubmitTask(
            runner_pb2.SubmitTaskRequest(
                task_id="same", task=task_pb2.Task(command=["true"])
            )
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await runner.rest("DELETE", "/api/v1/task/same")


async def test_defaults_make_an_identical_task(runner: Runner) -> None:
    _, first = await runner.rest("POST", "/api/v1/task/dflt", {"command": ["true"]})
    status, again = await runner.rest(
        "POST", "/api/v1/task/dflt", {"command": ["true"], "cores": 1}
    )
    assert status == 200
    assert again["submit_time"] == first["submit_time"]


BAD_INPUTS = [
    ("malformed JSON", "/api/v1/task/bad1", '{"command": [', "JSON"),
    ("unknown field", "/api/v1/task/bad2", {"command": ["true"], "nope": 1}, "nope"),
    ("empty command", "/api/v1/task/bad3", {"command": []}, "command"),
    ("cores 0", "/api/v1/task/bad4", {"command": ["true"], "cores": 0}, "cores"),
    ("cores -1", "/api/v1/task/bad5", {"command": ["true"], "cores": -1}, "cores"),
    ("id 201", "/api/v1/task/" + "a" * 201, {"command": ["true"]}, "task_id"),
    ("id space", "/api/v1/task/a%20b", {"command": ["true"]}, "task_id"),
    ("id NUL", "/api/v1/task/a%00b", {"command": ["true"]}, "task_id"),
    (
        "memory -5",
        "/api/v1/task/bad6",
        {"command": ["true"], "memory_mb": -5},
        "memory_mb",
    ),
    (
        "memory lots",
        "/api/v1/task/bad7",
        {"command": ["true"], "memory_mb": "lots"},
        "memory_mb",
    ),
    ("not an object", "/api/v1/task/bad8", "[1, 2]", "JSON object"),
    ("cores NaN", "/api/v1/task/bad9", {"command": ["true"], "cores": "NaN"}, "cores"),
]


@pytest.mark.parametrize(("what", "path", "body", "named"), BAD_INPUTS)
async def test_bad_input_is_400_naming_the_field(
    runner: Runner, what: str, path: str, body: object, named: str
) -> None:
    status, reply = await runner.rest(
        "POST", path, body, headers={"Content-Type": "application/json"}
    )
    assert status == 400, (what, reply)
    assert reply["code"] == 3
    assert named in reply["message"], reply
    assert "Traceback" not in reply["message"]


async def test_unknown_task_is_404(runner: Runner) -> None:
    status, body = await runner.rest("GET", "/api/v1/task/nobody")
    assert status == 404
    assert body["code"] == 5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runner.stub.GetTask(runner_pb2.GetTaskRequest(task_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_input_accepts_lower_camel_case(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST",
        "/api/v1/task/camel",
        {"command": ["pwd"], "memoryMb": 64, "workingDirectory": "/tmp"},
    )
    assert status == 200, body
    final = await runner.wait_rest("camel")
    assert final["output_log"] == "/tmp\n"
    assert final["task"]["memory_mb"] == 64


async def test_slash_in_task_id(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/run-42/extract", {"command": ["sleep", "30"]}
    )
    assert status == 200
    assert body["task_id"] == "run-42/extract"
    status, got = await runner.rest("GET", "/api/v1/task/run-42/extract")
    assert status == 200 and got["task_id"] == "run-42/extract"
    status, got = await runner.rest("POST", "/api/v1/task/run-42/extract:cancel", {})
    assert status == 200 and got["state"] == "CANCELLED"


async def test_environment_is_minimal(runner: Runner) -> None:
    os.environ["DAGGYR_TEST_SECRET"] = "hunter2"
    try:
        await runner.rest(
            "POST", "/api/v1/task/env", {"command": ["env"], "environment": {"X": "1"}}
        )
        final = await runner.wait_rest("env")
    finally:
        del os.environ["DAGGYR_TEST_SECRET"]
    names = {line.split("=", 1)[0] for line in final["output_log"].splitlines()}
    assert names == {"PATH", "LANG", "HOME", "TMPDIR", "X"}
    tmpdir = next(
        line.split("=", 1)[1]
        for line in final["output_log"].splitlines()
        if line.startswith("TMPDIR=")
    )
    assert tmpdir.startswith(runner.server.config.temp_root or "/")


async def test_stdin_is_dev_null(runner: Runner) -> None:
    await runner.rest("POST", "/api/v1/task/stdin", {"command": ["cat"]})
    final = await runner.wait_rest("stdin")
    assert final["state"] == "SUCCEEDED"
    assert final["output_log"] == ""


async def test_signal_is_recorded(runner: Runner) -> None:
    await runner.rest(
        "POST", "/api/v1/task/sig", {"command": ["sh", "-c", "kill -9 $$"]}
    )
    final = await runner.wait_rest("sig")
    assert final["state"] == "FAILED"
    assert final["signal"] == 9
    assert "exit_code" not in final


async def test_too_big_for_total_is_failed_precondition(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/huge", {"command": ["true"], "cores": 64}
    )
    assert status == 400
    assert body["code"] == 9
    assert "64 cores" in body["message"] and "2 in total" in body["message"]


async def test_every_http_rule_is_reachable(runner: Runner) -> None:
    """Walks the descriptor: an annotated RPC without a REST route fails here."""
    routes = routes_for(rpcs())
    annotated = {rpc.name for rpc in rpcs() if rpc.http is not None}
    assert annotated == {r.rpc.name for r in routes}
    assert len(annotated) == len(rpcs())
    await runner.rest("POST", "/api/v1/task/walk", {"command": ["true"]})
    for route in routes:
        path = route.template.text.replace("{task_id=**}", "walk")
        body = {"command": ["true"]} if route.body == "task" else {}
        status, reply = await runner.rest(
            route.method, path, body if route.method == "POST" else None
        )
        assert status == 200, (route.rpc.name, reply)


async def test_list_tasks(runner: Runner) -> None:
    for name in ("l1", "l2"):
        await runner.rest("POST", f"/api/v1/task/{name}", {"command": ["true"]})
        await runner.wait_rest(name)
    status, body = await runner.rest("GET", "/api/v1/task?state=SUCCEEDED")
    assert status == 200
    assert [t["task_id"] for t in body["tasks"]] == ["l1", "l2"]
    assert body["tasks"][0]["output_log"] == ""
    listed = await runner.stub.ListTasks(runner_pb2.ListTasksRequest())
    assert [t.task_id for t in listed.tasks] == ["l1", "l2"]


async def test_ready_health_and_reflection(runner: Runner) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    status, _ = await runner.rest("GET", "/ready")
    assert status == 200
    health = health_pb2_grpc.HealthStub(runner.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(runner.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in stub.ServerReflectionInfo(iter([request])):
        names = {s.name for s in answer.list_services_response.service}
        assert "daggyr.v1.Runner" in names
        break


async def test_malformed_grpc_message_is_invalid_argument(runner: Runner) -> None:
    call = runner.channel.unary_unary("/daggyr.v1.Runner/SubmitTask")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_start_time_is_the_same_while_running_and_final(runner: Runner) -> None:
    _, running = await runner.rest(
        "POST", "/api/v1/task/st", {"command": ["sleep", "0.3"]}
    )
    assert running["state"] == "RUNNING"
    final = await runner.wait_rest("st")
    assert final["start_time"] == running["start_time"]
