"""Stopping the real ``daggyr`` process: SIGTERM, a second signal, SIGKILL.

The runner is stateless: a stop cancels every task and removes its cgroups; a
runner killed outright leaves them, and its next start cleans them up.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daggyr.v1 import runner_pb2, runner_pb2_grpc, task_pb2

from .conftest import require_cgroups
from .process_helpers import (
    Foreground,
    cgroup_dirs,
    grpc_health,
    http,
    kill_by_pid,
    marked_pids,
    state,
    submit,
    task_cgroups,
    wait_until,
    write_config,
)

# One of the three ignores SIGTERM, and so does the sleep it starts.
COMMANDS = {
    "plain-1": ["sleep", "300"],
    "plain-2": ["sleep", "300"],
    "stubborn": ["sh", "-c", "trap '' TERM; sleep 300"],
}


def _start_three(port: int, marker: str) -> None:
    for task_id, command in COMMANDS.items():
        submit(port, task_id, command, marker)
    for task_id in COMMANDS:
        wait_until(f"{task_id} to run", lambda t=task_id: state(port, t) == "RUNNING")
    # sleep, sleep, and the stubborn sh with its sleep.
    wait_until("the tasks' processes", lambda: len(marked_pids(marker)) >= 4)


def test_sigterm_cancels_every_task_and_removes_cgroups(tmp_path: Path) -> None:
    require_cgroups()
    config, data = write_config(tmp_path, kill_grace_seconds=2)
    root, marker = data["cgroup_root"], uuid.uuid4().hex
    runner = Foreground(config, tmp_path / "daggyr.log")
    pids: list[int] = []
    try:
        runner.wait_ready()
        port = runner.rest_port
        _start_three(port, marker)
        pids = marked_pids(marker)
        assert len(task_cgroups(root)) >= 3

        signalled = time.monotonic()
        runner.proc.send_signal(signal.SIGTERM)
        code = runner.proc.wait(30)
        took = time.monotonic() - signalled

        assert code == 0, runner.log()
        assert took < 2 + 2, f"exit took {took:.1f} s with a 2 s grace"
        assert marked_pids(marker) == []
        assert cgroup_dirs(root) == []
        log = runner.log()
        assert "shutting down: cancelling 3 task(s), grace 2 s" in log
        assert re.search(r"shut down in \d+\.\d s", log)
        assert log.count("finished: state=CANCELLED") == 3
    finally:
        runner.close()
        kill_by_pid(pids)


def test_second_signal_cuts_the_grace_short(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, kill_grace_seconds=60)
    marker = uuid.uuid4().hex
    runner = Foreground(config, tmp_path / "daggyr.log")
    pids: list[int] = []
    try:
        runner.wait_ready()
        port = runner.rest_port
        submit(port, "stubborn", COMMANDS["stubborn"], marker)
        wait_until("the task to run", lambda: len(marked_pids(marker)) >= 2)
        pids = marked_pids(marker)

        runner.proc.send_signal(signal.SIGTERM)
        wait_until("the shutdown to start", lambda: "shutting down" in runner.log())
        # During the grace: still answering, but neither ready nor accepting.
        assert http(port, "GET", "/ready")[0] == 503
        assert grpc_health(runner.grpc_port) == "NOT_SERVING"
        status, body = http(port, "POST", "/api/v1/task/late", {"command": ["true"]})
        assert status == 503, body
        runner.proc.send_signal(signal.SIGINT)
        code = runner.proc.wait(30)  # far less than the 60 s grace

        assert code == 0, runner.log()
        assert marked_pids(marker) == []
        assert "second SIGINT: cutting the grace short" in runner.log()
    finally:
        runner.close()
        kill_by_pid(pids)


def test_next_start_cleans_what_a_killed_runner_left(tmp_path: Path) -> None:
    require_cgroups()
    config, data = write_config(tmp_path)
    root, marker = data["cgroup_root"], uuid.uuid4().hex
    first = Foreground(config, tmp_path / "first.log")
    second: Foreground | None = None
    pids: list[int] = []
    try:
        first.wait_ready()
        _start_three(first.rest_port, marker)
        pids = marked_pids(marker)
        left = task_cgroups(root)

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        # The main processes die with the runner (parent-death signal); the
        # sleep the stubborn shell started is orphaned, still in its cgroup.
        wait_until("the main processes to die", lambda: len(marked_pids(marker)) == 1)
        assert task_cgroups(root) == left

        second = Foreground(config, tmp_path / "second.log")
        second.wait_ready()
        assert marked_pids(marker) == []
        assert task_cgroups(root) == []
        cleaned = re.findall(r"cleaned leftover cgroup (\S+)", second.log())
        assert len(cleaned) == len(COMMANDS), second.log()
        assert "killed 1 processes" in second.log()

        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
        assert cgroup_dirs(root) == []
    finally:
        first.close()
        if second is not None:
            second.close()
        kill_by_pid(pids)


async def test_open_streams_end_promptly_and_the_log_tells_the_time(
    tmp_path: Path,
) -> None:
    require_cgroups()
    grace = 2
    config, _ = write_config(tmp_path, kill_grace_seconds=grace)
    marker = uuid.uuid4().hex
    runner = Foreground(config, tmp_path / "daggyr.log")
    pids: list[int] = []
    stalled = socket.socket()
    try:
        runner.wait_ready()
        port, grpc_port = runner.rest_port, runner.grpc_port
        submit(port, "stubborn", COMMANDS["stubborn"], marker)
        wait_until("the task's processes", lambda: len(marked_pids(marker)) >= 2)
        pids = marked_pids(marker)
        rest_states: list[str] = []
        grpc_states: list[str] = []

        async def rest_watch(http: aiohttp.ClientSession) -> None:
            url = f"http://127.0.0.1:{port}/api/v1/task/stubborn:watch"
            async with http.get(url) as response:
                async for line in response.content:
                    rest_states.append(json.loads(line)["result"]["state"])

        async def grpc_watch(stub: runner_pb2_grpc.RunnerStub) -> None:
            request = runner_pb2.WatchTaskRequest(task_id="stubborn")
            async for attempt in stub.WatchTask(request):
                grpc_states.append(task_pb2.State.Name(attempt.state))

        async def health_watch(stub: health_pb2_grpc.HealthStub) -> None:
            # Never ends by itself: only the server closing it does.
            async for _ in stub.Watch(health_pb2.HealthCheckRequest()):
                pass

        # A client that sent half a request and stalls: aiohttp alone would
        # wait for it for up to a minute.
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(
            b"POST /api/v1/task/slow HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        async with (
            aiohttp.ClientSession() as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
        ):
            watchers = [
                asyncio.ensure_future(rest_watch(http)),
                asyncio.ensure_future(grpc_watch(runner_pb2_grpc.RunnerStub(channel))),
                asyncio.ensure_future(
                    health_watch(health_pb2_grpc.HealthStub(channel))
                ),
            ]
            while len(rest_states) < 1 or len(grpc_states) < 1:
                await asyncio.sleep(0.05)

            signalled = time.monotonic()
            runner.proc.send_signal(signal.SIGTERM)
            while runner.proc.poll() is None and time.monotonic() - signalled < 30:
                await asyncio.sleep(0.02)
            took = time.monotonic() - signalled
            await asyncio.wait(watchers, timeout=10)

        assert runner.proc.returncode == 0, runner.log()
        assert took < grace + 1.5, f"exit took {took:.1f} s with a {grace} s grace"
        assert rest_states == ["RUNNING", "CANCELLED"]
        assert grpc_states == ["RUNNING", "CANCELLED"]
        logged = re.search(r"shut down in (\d+\.\d) s", runner.log())
        assert logged, runner.log()
        # The figure logged covers the whole stop, within what is left of the
        # process's exit after it.
        assert grace <= float(logged.group(1)) + 0.05 <= took + 0.1
        assert took - float(logged.group(1)) < 1.0
    finally:
        stalled.close()
        runner.close()
        kill_by_pid(pids)
