"""Task lifecycle at scale: queueing, backfill, timeouts, output caps, watching,
paging and retention, on a real server."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import psutil
import pytest

from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner, require_cgroups
from .process_helpers import marked_pids

MakeRunner = Callable[..., Awaitable[Runner]]


async def capacity(runner: Runner) -> dict[str, Any]:
    status, body = await runner.rest("GET", "/api/v1/capacity")
    assert status == 200
    return body


async def test_ten_tasks_on_two_cores(runner: Runner) -> None:
    started = time.monotonic()
    for n in range(10):
        status, body = await runner.rest(
            "POST", f"/api/v1/task/q{n}", {"command": ["sleep", "1"], "memory_mb": 32}
        )
        assert status == 200
        assert body["state"] == ("RUNNING" if n < 2 else "QUEUED")
        report = await capacity(runner)
        assert report["running_tasks"] == min(n + 1, 2)
        assert report["queued_tasks"] == max(0, n + 1 - 2)
        assert report["free"]["cores"] == 2 - min(n + 1, 2)

    most_running = 0
    while time.monotonic() - started < 15:
        report = await capacity(runner)
        most_running = max(most_running, report["running_tasks"])
        assert report["free"]["cores"] == 2 - report["running_tasks"]
        assert report["free"]["memory_mb"] == 4096 - 32 * report["running_tasks"]
        if report["running_tasks"] == 0 and report["queued_tasks"] == 0:
            break
        await asyncio.sleep(0.05)
    wall = time.monotonic() - started
    assert most_running == 2
    for n in range(10):
        final = await runner.wait_rest(f"q{n}")
        assert final["state"] == "SUCCEEDED"
    assert 4.5 <= wall <= 8


async def test_backfill_is_bounded(make_runner: MakeRunner) -> None:
    runner = await make_runner(max_backfill_overtakes=2)
    one = {"command": ["sleep", "0.6"], "memory_mb": 32}
    await runner.rest("POST", "/api/v1/task/first", one)
    await runner.rest("POST", "/api/v1/task/second", {**one, "command": ["sleep", "1"]})
    _, big = await runner.rest(
        "POST", "/api/v1/task/big", {"command": ["true"], "cores": 2, "memory_mb": 32}
    )
    assert big["state"] == "QUEUED"
    for n in range(5):
        await runner.rest("POST", f"/api/v1/task/small{n}", one)

    big_final = await runner.wait_rest("big")
    starts = {}
    for task_id in ["first", "second", "big"] + [f"small{n}" for n in range(5)]:
        attempt = await runner.wait_rest(task_id)
        assert attempt["state"] == "SUCCEEDED", attempt
        starts[task_id] = attempt["start_time"]
    overtook = [n for n in range(5) if starts[f"small{n}"] < big_final["start_time"]]
    # Backfill happened, but no more than the bound let smaller tasks overtake.
    assert overtook == [0, 1]


async def test_timeout_kills_the_tree(runner: Runner) -> None:
    require_cgroups()
    mark = f"tmo-{uuid.uuid4().hex}"
    await runner.rest(
        "POST",
        "/api/v1/task/tmo",
        {
            "command": ["sh", "-c", "sleep 100 & sleep 100"],
            "timeout_seconds": 1,
            "environment": {"DAGGYR_CASE_MARK": mark},
        },
    )
    final = await runner.wait_rest("tmo")
    assert final["state"] == "TIMED_OUT"
    assert "timeout of 1 s" in final["executor_log"]
    from .test_api import _seconds

    took = _seconds(final["stop_time"]) - _seconds(final["start_time"])
    assert 1 <= took <= 1 + 2 + 1  # timeout + grace + 1 s
    assert marked_pids(mark, "DAGGYR_CASE_MARK") == []


async def test_output_flood_is_capped(runner: Runner) -> None:
    me = psutil.Process()
    before = me.memory_info().rss
    await runner.rest(
        "POST", "/api/v1/task/flood", {"command": ["timeout", "5", "yes"]}
    )
    final = await runner.wait_rest("flood")
    grew = me.memory_info().rss - before
    # `timeout` ends yes with SIGTERM: exit 124 from timeout itself.
    assert final["exit_code"] == 124
    assert final["output_truncated"] is True
    text = final["output_log"]
    dropped = int(re.search(r"\[daggyr: (\d+) bytes dropped\]", text).group(1))
    head, _, tail = text.partition(f"\n[daggyr: {dropped} bytes dropped]\n")
    assert head.startswith("y\ny\n") and tail.endswith("y\n")
    assert len(head) + len(tail) == 1 << 20
    # yes writes several hundred MB/s to a pipe read at full speed.
    assert dropped > 200 * (1 << 20)
    assert grew < 16 * (1 << 20)


async def test_binary_output_both_protocols(runner: Runner) -> None:
    await runner.rest(
        "POST", "/api/v1/task/rand", {"command": ["head", "-c", "1000", "/dev/urandom"]}
    )
    final = await runner.wait_rest("rand")
    assert final["state"] == "SUCCEEDED"
    assert "\ufffd" in final["output_log"]
    got = await runner.stub.GetTask(runner_pb2.GetTaskRequest(task_id="rand"))
    assert got.output_log == final["output_log"]


async def test_watch_on_both_protocols(runner: Runner) -> None:
    await runner.rest(
        "POST", "/api/v1/task/w", {"command": ["sh", "-c", "sleep 0.5; echo w"]}
    )

    async def rest_watch() -> list[dict[str, Any]]:
        lines = []
        async with runner.http.get(f"{runner.base}/api/v1/task/w:watch") as response:
            assert response.status == 200
            async for line in response.content:
                lines.append(json.loads(line)["result"])
        return lines

    async def grpc_watch() -> list[task_pb2.TaskAttempt]:
        request = runner_pb2.WatchTaskRequest(task_id="w")
        return [a async for a in runner.stub.WatchTask(request)]

    via_rest, via_grpc = await asyncio.gather(rest_watch(), grpc_watch())
    assert via_rest[-1]["state"] == "SUCCEEDED"
    assert via_rest[-1]["output_log"] == "w\n"
    assert via_grpc[-1].state == task_pb2.SUCCEEDED
    assert via_rest[-1]["stop_time"] == via_grpc[-1].stop_time.ToJsonString()
    assert via_rest[0]["state"] == "RUNNING"


async def test_watchers_that_leave_early_leave_nothing(runner: Runner) -> None:
    await runner.rest("POST", "/api/v1/task/lw", {"command": ["sleep", "2"]})

    async def rest_leaver() -> None:
        session = aiohttp.ClientSession()
        try:
            response = await session.get(f"{runner.base}/api/v1/task/lw:watch")
            await response.content.readline()
            response.close()
        finally:
            await session.close()

    async def grpc_leaver() -> None:
        call = runner.stub.WatchTask(runner_pb2.WatchTaskRequest(task_id="lw"))
        await call.read()
        call.cancel()

    await asyncio.gather(*[rest_leaver() for _ in range(5)])
    await asyncio.gather(*[grpc_leaver() for _ in range(5)])
    await asyncio.sleep(0.3)
    assert runner.server.runner is not None
    record = runner.server.runner.table.get("lw")
    assert not record.waiters
    final = await runner.wait_rest("lw")
    assert final["state"] == "SUCCEEDED"


async def test_wait_seconds_over_60_is_out_of_range(runner: Runner) -> None:
    await runner.rest("POST", "/api/v1/task/ws", {"command": ["true"]})
    status, body = await runner.rest("GET", "/api/v1/task/ws?wait_seconds=61")
    assert status == 400
    assert body["code"] == 11 and "wait_seconds" in body["message"]


async def test_list_pages_through_a_changing_table(make_runner: MakeRunner) -> None:
    runner = await make_runner(
        capacity_overrides={"cores": 2, "memory_mb": 4096}, max_queued_tasks=2000
    )
    ids = [f"page/{n:04d}" for n in range(1000)]
    for task_id in ids:
        status, _ = await runner.rest(
            "POST",
            f"/api/v1/task/{task_id}",
            {"command": ["true"], "cores": 0.05, "memory_mb": 1},
        )
        assert status == 200
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        query = "page_size=100" + (f"&page_token={token}" if token else "")
        status, body = await runner.rest("GET", f"/api/v1/task?{query}")
        assert status == 200, body
        pages += 1
        assert len(body["tasks"]) <= 100
        assert all(
            "output_log" not in t or t["output_log"] == "" for t in body["tasks"]
        )
        seen += [t["task_id"] for t in body["tasks"]]
        token = body["next_page_token"]
        if not token:
            break
        await asyncio.sleep(0.02)  # tasks finish underneath
    assert seen == ids
    assert pages == 10


async def test_bad_page_token(runner: Runner) -> None:
    status, body = await runner.rest("GET", "/api/v1/task?page_token=garbage")
    assert status == 400 and "page_token" in body["message"]


async def test_results_expire_and_delete_forgets(make_runner: MakeRunner) -> None:
    runner = await make_runner(result_ttl_seconds=1)
    await runner.rest("POST", "/api/v1/task/ttl", {"command": ["true"]})
    final = await runner.wait_rest("ttl")
    assert final["expire_time"]
    await asyncio.sleep(1.5)
    status, _ = await runner.rest("GET", "/api/v1/task/ttl")
    assert status == 404

    await runner.rest("POST", "/api/v1/task/del", {"command": ["sleep", "30"]})
    status, body = await runner.rest("DELETE", "/api/v1/task/del")
    assert status == 200 and body["state"] == "CANCELLED"
    status, _ = await runner.rest("GET", "/api/v1/task/del")
    assert status == 404
    report = await capacity(runner)
    assert report["free"] == report["total"]


async def test_queue_limit_is_resource_exhausted(make_runner: MakeRunner) -> None:
    runner = await make_runner(max_queued_tasks=1)
    body = {"command": ["sleep", "5"], "cores": 2}
    assert (await runner.rest("POST", "/api/v1/task/r", body))[0] == 200
    assert (await runner.rest("POST", "/api/v1/task/q", body))[0] == 200
    status, reply = await runner.rest("POST", "/api/v1/task/x", body)
    assert status == 429 and reply["code"] == 8
    assert "queue" in reply["message"]


@pytest.mark.parametrize("cores", [3, 2.5])
async def test_bigger_than_total_names_both_figures(
    runner: Runner, cores: float
) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/big", {"command": ["true"], "cores": cores}
    )
    assert status == 400 and body["code"] == 9
    assert f"{cores:g} cores" in body["message"] and "2 in total" in body["message"]


async def test_shutdown_cancels_queued_and_running(make_runner: MakeRunner) -> None:
    runner = await make_runner(kill_grace_seconds=1)
    for n in range(4):
        await runner.rest(
            "POST", f"/api/v1/task/sd{n}", {"command": ["sleep", "30"], "cores": 1}
        )
    core = runner.server.runner
    assert core is not None
    seen: list[tuple[str, int]] = []
    core.listeners.append(lambda rec, _old, new: seen.append((rec.task_id, new.state)))
    await runner.server.stop()
    finals = {task_id: state for task_id, state in seen}
    assert finals == {f"sd{n}": task_pb2.CANCELLED for n in range(4)}
    # Queued tasks are cancelled, never started by the capacity freed meanwhile.
    assert (("sd2", task_pb2.RUNNING)) not in seen
    assert (("sd3", task_pb2.RUNNING)) not in seen
    assert core.running == set() and core.queue == []
    assert core.reserved.micro_cores == 0


async def test_start_up_cleans_only_its_own_temp_dirs(
    make_runner: MakeRunner, tmp_path: Any
) -> None:
    shared = tmp_path / "shared"
    (shared / "someone-elses").mkdir(parents=True)
    (shared / "7-leftover").mkdir()
    await make_runner(temp_root=str(shared))
    assert (shared / "someone-elses").is_dir()
    assert not (shared / "7-leftover").exists()


async def test_deleted_results_are_not_held_until_expiry(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner(result_ttl_seconds=3600)
    core = runner.server.runner
    assert core is not None
    for n in range(6):
        await runner.rest("POST", f"/api/v1/task/gone{n}", {"command": ["true"]})
        await runner.wait_rest(f"gone{n}")
        await runner.rest("DELETE", f"/api/v1/task/gone{n}")
    await runner.rest("POST", "/api/v1/task/kept", {"command": ["true"]})
    await runner.wait_rest("kept")
    # Deleted results leave the expiry queue (in batches), the kept one stays.
    assert [r.task_id for r in core.table._expiring] == ["kept"]
