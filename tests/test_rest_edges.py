"""Hostile and odd HTTP: every answer is JSON, never a 500, and the runner serves on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2, health_pb2_grpc

from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner


async def raw_http(runner: Runner, request: bytes, read_seconds: float = 5) -> bytes:
    """Send bytes as they are and return what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.server.rest_port)
    writer.write(request)
    await writer.drain()
    try:
        async with asyncio.timeout(read_seconds):
            return await reader.read(65536)
    finally:
        writer.close()


async def test_deep_nesting_is_400(runner: Runner) -> None:
    deep = "[" * 100000 + "]" * 100000
    status, body = await runner.rest(
        "POST", "/api/v1/task/n1", deep, headers={"Content-Type": "application/json"}
    )
    assert status == 400 and body["code"] == 3
    assert "nested too deeply" in body["message"]

    env = '{"command": ["true"], "environment": ' + '{"a": ' * 5000 + "1" + "}" * 5001
    status, body = await runner.rest("POST", "/api/v1/task/n2", env)
    assert status == 400 and body["code"] == 3


async def test_bad_content_encoding_is_400(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST",
        "/api/v1/task/enc",
        '{"command": ["true"]}',
        headers={"Content-Encoding": "gzip"},
    )
    assert status == 400 and body["code"] == 3
    assert "cannot be read" in body["message"]


async def test_duplicate_keys_are_refused(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/dup", '{"command": ["true"], "command": ["false"]}'
    )
    assert status == 400 and "'command' twice" in body["message"]


async def test_wrong_method_is_405_with_allow(runner: Runner) -> None:
    async with runner.http.request("PUT", f"{runner.base}/api/v1/capacity") as reply:
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET, HEAD"
        assert (await reply.json())["code"] == 12
    async with runner.http.post(f"{runner.base}/ready") as reply:
        assert reply.status == 405
        assert "GET" in reply.headers["Allow"]


async def test_head_is_served_like_get(runner: Runner) -> None:
    async with runner.http.head(f"{runner.base}/api/v1/capacity") as reply:
        assert reply.status == 200
    async with runner.http.head(f"{runner.base}/api/v1/task/none") as reply:
        assert reply.status == 404


async def test_query_cannot_override_the_path(runner: Runner) -> None:
    await runner.rest("POST", "/api/v1/task/mine", {"command": ["true"]})
    status, body = await runner.rest("GET", "/api/v1/task/mine?task_id=other")
    assert status == 400 and "task_id" in body["message"]


async def test_unknown_state_number_is_refused(runner: Runner) -> None:
    status, body = await runner.rest("GET", "/api/v1/task?state=99")
    assert status == 400 and "state 99" in body["message"]
    status, body = await runner.rest("GET", "/api/v1/task?state=BOGUS")
    assert status == 400 and "state" in body["message"]


async def test_expect_continue_with_a_huge_length_is_refused_at_once(
    runner: Runner,
) -> None:
    reply = await raw_http(
        runner,
        b"POST /api/v1/task/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"max_request_bytes" in reply


async def test_relative_working_directory_is_refused(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST",
        "/api/v1/task/rel",
        {"command": ["true"], "working_directory": "sub/dir"},
    )
    assert status == 400 and "working_directory" in body["message"]
    assert "absolute" in body["message"]


async def test_argv_execve_cannot_carry_is_refused(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/e2big", {"command": ["echo", "x" * 200000]}
    )
    assert status == 400 and "command[1]" in body["message"]
    many = ["echo"] + ["y" * 100000] * 30
    status, body = await runner.rest("POST", "/api/v1/task/e2big2", {"command": many})
    assert status == 400 and "command and environment" in body["message"]


async def test_list_pages_stay_under_grpc_default_message_size(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    runner = await make_runner(max_request_bytes=8 << 20)
    big = ["true"] + ["z" * 100000] * 12  # 1.2 MB of argv per task
    for n in range(6):
        status, _ = await runner.rest("POST", f"/api/v1/task/wide{n}", {"command": big})
        assert status == 200
    seen, token = [], ""
    while True:
        reply = await runner.stub.ListTasks(
            runner_pb2.ListTasksRequest(page_token=token)
        )
        assert reply.ByteSize() < 4 << 20
        seen += [t.task_id for t in reply.tasks]
        token = reply.next_page_token
        if not token:
            break
    assert seen == [f"wide{n}" for n in range(6)]


async def test_health_answers_for_the_runner_service(runner: Runner) -> None:
    stub = health_pb2_grpc.HealthStub(runner.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service="daggyr.v1.Runner"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_runner_keeps_serving_after_all_of_it(runner: Runner) -> None:
    for garbage in (
        b"FOO / HTTP/1.1\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        await raw_http(runner, garbage)
    status, _ = await runner.rest("GET", "/ready")
    assert status == 200
    reply = await runner.stub.SubmitTask(
        runner_pb2.SubmitTaskRequest(
            task_id="after", task=task_pb2.Task(command=["true"])
        )
    )
    assert reply.task_id == "after"
