"""max_request_bytes on both protocols: refused with the limit named, memory flat."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest

from daggyr.v1 import runner_pb2, runner_pb2_grpc, task_pb2

from .conftest import Runner
from .spawn import spawned_runner, vm_peak_kib

MakeRunner = Callable[..., Awaitable[Runner]]
MIB = 1 << 20
LIMIT = 64 * 1024  # small: aiohttp warns about sending big raw bodies


def _submission(filler: int) -> bytes:
    """A valid SubmitTask body about ``filler`` bytes long."""
    task = {"command": ["true"], "environment": {"FILLER": "x" * filler}}
    return json.dumps(task).encode()


async def test_rest_body_over_the_limit_is_refused(make_runner: MakeRunner) -> None:
    runner = await make_runner(max_request_bytes=LIMIT)
    headers = {"Content-Type": "application/json"}

    body = _submission(LIMIT - 1024)
    status, reply = await runner.rest(
        "POST", "/api/v1/task/fits", body, headers=headers
    )
    assert status == 200, reply

    body = _submission(LIMIT + 1)
    status, reply = await runner.rest("POST", "/api/v1/task/big", body, headers=headers)
    assert status == 413
    assert reply["code"] == 8
    assert reply["details"] == []
    assert f"max_request_bytes ({LIMIT} bytes)" in reply["message"]
    status, _ = await runner.rest("GET", "/api/v1/task/big")
    assert status == 404


async def test_grpc_message_over_the_limit_is_refused(make_runner: MakeRunner) -> None:
    runner = await make_runner(max_request_bytes=LIMIT)
    fits = task_pb2.Task(command=["true"], environment={"FILLER": "x" * (LIMIT - 1024)})
    await runner.stub.SubmitTask(
        runner_pb2.SubmitTaskRequest(task_id="fits", task=fits)
    )

    big = task_pb2.Task(command=["true"], environment={"FILLER": "x" * LIMIT})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runner.stub.SubmitTask(
            runner_pb2.SubmitTaskRequest(task_id="big", task=big)
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # grpc itself writes this message; it names the limit in bytes.
    assert f"vs. {LIMIT}" in (caught.value.details() or "")


async def _chunks(total: int) -> AsyncIterator[bytes]:
    """``total`` bytes of a JSON body, a MiB at a time, never held whole."""
    head = b'{"command": ["true"], "environment": {"FILLER": "'
    tail = b'"}}'
    yield head
    chunk = b"x" * MIB
    left = total - len(head) - len(tail)
    while left > 0:
        piece = chunk[: min(MIB, left)]
        left -= len(piece)
        yield piece
    yield tail


async def test_64_mib_requests_do_not_grow_the_runner(tmp_path: Path) -> None:
    """The runner in its own process, so that its peak RSS is its own."""
    size = 64 * MIB
    async with spawned_runner(tmp_path) as spawned, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{spawned.rest_port}"
        target = f"127.0.0.1:{spawned.grpc_port}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = runner_pb2_grpc.RunnerStub(channel)
            await stub.GetCapacity(runner_pb2.GetCapacityRequest())
            async with http.get(base + "/api/v1/capacity") as response:
                assert response.status == 200
            before = vm_peak_kib(spawned.proc.pid)

            headers = {"Content-Type": "application/json", "Content-Length": str(size)}
            async with http.post(
                base + "/api/v1/task/huge", data=_chunks(size), headers=headers
            ) as response:
                assert response.status == 413
                reply = await response.json()
            assert "max_request_bytes (4194304 bytes)" in reply["message"]

            async with http.post(
                base + "/api/v1/task/huge-chunked",
                data=_chunks(size),
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 413

            big = task_pb2.Task(command=["true"], environment={"FILLER": "x" * size})
            request = runner_pb2.SubmitTaskRequest(task_id="huge", task=big)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitTask(request)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "vs. 4194304" in (caught.value.details() or "")

            # Still serving, and nothing of the refused requests was kept.
            await stub.GetCapacity(runner_pb2.GetCapacityRequest())
            async with http.get(base + "/api/v1/task") as response:
                assert (await response.json()).get("tasks", []) == []
            growth_mib = (vm_peak_kib(spawned.proc.pid) - before) / 1024
        assert growth_mib < 32, f"runner's peak RSS grew by {growth_mib:.1f} MiB"
        print(f"runner's peak RSS growth: {growth_mib:.1f} MiB")
