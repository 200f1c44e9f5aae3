"""``daggyr submit|status|cancel|capacity|list`` as a user runs them.

The CLI runs as a subprocess against an in-process runner, which serves on
this test's event loop: so the subprocess is always awaited, never waited for
with a blocking call.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from daggyr.cli_client import (
    EXIT_BROKEN_PIPE,
    EXIT_CANCELLED,
    EXIT_SYSTEM_ERROR,
    EXIT_TIMED_OUT,
)
from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner

DAGGYR = str(Path(sys.executable).with_name("daggyr"))
State = task_pb2.State


class Result:
    def __init__(self, code: int, stdout: bytes, stderr: bytes) -> None:
        self.code = code
        self.stdout = stdout.decode()
        self.stderr = stderr.decode()

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        DAGGYR,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> Result:
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Result(process.returncode, stdout, stderr)


async def daggyr(*args: str) -> Result:
    return await finish(await start(*args))


def urls(runner: Runner) -> dict[str, str]:
    return {
        "rest": f"http://127.0.0.1:{runner.server.rest_port}",
        "grpc": f"grpc://127.0.0.1:{runner.server.grpc_port}",
    }


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
async def test_submit_prints_output_and_exits_with_the_code(
    runner: Runner, protocol: str
) -> None:
    url = urls(runner)[protocol]
    result = await daggyr(
        "submit", "--runner", url, "--", "sh", "-c", "echo hi; echo oops >&2; exit 7"
    )
    assert result.code == 7, result
    assert result.stdout == "hi\n"
    assert "oops\n" in result.stderr
    assert "FAILED (exit code 7)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
async def test_submit_options_reach_the_task(runner: Runner, protocol: str) -> None:
    result = await daggyr(
        "submit", "--runner", urls(runner)[protocol], "--id", f"opts-{protocol}",
        "--cores", "0.5", "--memory-mb", "96", "--env", "A=1", "--env", "B=x=y",
        "-q", "--", "sh", "-c", 'echo "$A $B"',
    )  # fmt: skip
    assert (result.code, result.stdout, result.stderr) == (0, "1 x=y\n", ""), result
    held = await runner.stub.GetTask(
        runner_pb2.GetTaskRequest(task_id=f"opts-{protocol}")
    )
    assert (held.task.cores, held.task.memory_mb) == (0.5, 96)


async def test_exit_codes_for_signal_timeout_and_system_error(runner: Runner) -> None:
    url = urls(runner)["rest"]
    killed = await daggyr("submit", "--runner", url, "--", "sh", "-c", "kill -9 $$")
    assert killed.code == 128 + 9, killed
    assert "FAILED (signal 9)" in killed.stderr

    slow = await daggyr(
        "submit", "--runner", url, "--timeout", "1", "--", "sleep", "30"
    )
    assert slow.code == EXIT_TIMED_OUT == 201, slow
    assert "TIMED_OUT" in slow.stderr

    missing = await daggyr("submit", "--runner", url, "--", "/no/such/program")
    assert missing.code == EXIT_SYSTEM_ERROR == 204, missing
    assert "SYSTEM_ERROR" in missing.stderr and "not found" in missing.stderr


async def test_submit_json(runner: Runner) -> None:
    url = urls(runner)["grpc"]
    result = await daggyr("submit", "--runner", url, "--json", "--", "echo", "hi")
    assert result.code == 0, result
    attempt = json.loads(result.stdout)
    assert attempt["state"] == "SUCCEEDED" and attempt["output_log"] == "hi\n"
    assert attempt["task_id"].startswith("submit-")


async def test_submit_through_a_pool(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    small = await make_runner(capacity_overrides={"cores": 1, "memory_mb": 512})
    big = await make_runner(capacity_overrides={"cores": 4, "memory_mb": 4096})
    result = await daggyr(
        "submit", "--runner", urls(small)["rest"], "--runner", urls(big)["grpc"],
        "--id", "pooled", "--", "echo", "pooled",
    )  # fmt: skip
    assert (result.code, result.stdout) == (0, "pooled\n"), result
    assert f"pooled RUNNING on {urls(big)['grpc']}" in result.stderr
    await big.stub.GetTask(runner_pb2.GetTaskRequest(task_id="pooled"))


async def test_interrupt_cancels_the_remote_task(runner: Runner) -> None:
    url = urls(runner)["rest"]
    process = await start(
        "submit", "--runner", url, "--id", "ctrl-c", "--", "sleep", "60"
    )
    await _until_running(runner, "ctrl-c")
    process.send_signal(signal.SIGINT)
    result = await finish(process)
    assert result.code == 130, result
    assert "cancelling task ctrl-c" in result.stderr
    held = await runner.stub.GetTask(runner_pb2.GetTaskRequest(task_id="ctrl-c"))
    assert held.state == State.CANCELLED


async def test_cancel_status_list_and_capacity(runner: Runner) -> None:
    rest, grpc_ = urls(runner)["rest"], urls(runner)["grpc"]
    waiting = await start(
        "submit", "--runner", grpc_, "--id", "victim", "--", "sleep", "60"
    )
    await _until_running(runner, "victim")

    listed = await daggyr("list", "--runner", rest, "--state", "running")
    assert listed.code == 0, listed
    header, row = listed.stdout.splitlines()
    assert header.split() == [
        "TASK_ID", "STATE", "EXIT", "CORES", "MEMORY_MB", "DURATION", "COMMAND"
    ]  # fmt: skip
    assert row.split()[:3] == ["victim", "RUNNING", "-"]

    capacity = await daggyr("capacity", "--runner", rest)
    assert capacity.code == 0, capacity
    assert capacity.stdout.splitlines()[1].split()[:5] == [
        rest,
        "1/2",
        "3584/4096",
        "1",
        "0",
    ]
    as_json = json.loads((await daggyr("capacity", "--runner", grpc_, "--json")).stdout)
    assert as_json["free"] == {"cores": 1.0, "memory_mb": 3584}
    assert as_json["running_tasks"] == 1

    cancelled = await daggyr("cancel", "--runner", rest, "victim")
    assert cancelled.code == 0, cancelled
    assert "state           CANCELLED" in cancelled.stdout
    submitted = await finish(waiting)
    assert submitted.code == EXIT_CANCELLED == 203, submitted

    status = await daggyr("status", "--runner", grpc_, "victim", "--json")
    assert json.loads(status.stdout)["state"] == "CANCELLED"
    shown = await daggyr("status", "--runner", rest, "victim")
    assert "task_id         victim" in shown.stdout
    assert "command         sleep 60" in shown.stdout

    every = json.loads((await daggyr("list", "--runner", rest, "--json")).stdout)
    assert [(t["task_id"], t["state"]) for t in every] == [("victim", "CANCELLED")]
    none = await daggyr("list", "--runner", rest, "--state", "QUEUED")
    assert none.stdout.splitlines()[1:] == []

    missing = await daggyr("status", "--runner", rest, "nope")
    assert missing.code == 1, missing
    assert missing.stderr == "daggyr: task 'nope' not found\n"


async def _into_head(tmp_path: Path, *args: str) -> Result:
    """``daggyr ARGS | head -c 100``: daggyr's exit status and its stderr."""
    errors = tmp_path / "stderr"
    script = 'daggyr="$1"; shift; "$daggyr" "$@" 2>"$ERRORS" | head -c 100 >/dev/null'
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script + '; exit "${PIPESTATUS[0]}"',
        "bash",
        DAGGYR,
        *args,
        env={**os.environ, "ERRORS": str(errors)},
    )
    code = await asyncio.wait_for(process.wait(), 60)
    return Result(code, b"", errors.read_bytes())


async def test_a_reader_that_goes_away_ends_the_output_quietly(
    runner: Runner, tmp_path: Path
) -> None:
    rest, grpc_ = urls(runner)["rest"], urls(runner)["grpc"]
    # Each output is several times what a pipe holds: the reader leaves mid-way.
    big = ["sh", "-c", "seq 1 300000"]
    await runner.stub.SubmitTask(
        runner_pb2.SubmitTaskRequest(task_id="big", task=task_pb2.Task(command=big))
    )
    await runner.wait_rest("big")
    commands = [
        ["status", "--runner", rest, "big"],
        ["status", "--runner", grpc_, "big", "--json"],
        ["submit", "-q", "--runner", rest, "--", *big],
    ]
    for args in commands:
        result = await _into_head(tmp_path, *args)
        assert result.code == EXIT_BROKEN_PIPE == 141, (args, result)
        assert result.stderr == "", (args, result)

    for n in range(400):  # one runs, the rest queue: a long list, cheaply
        task = task_pb2.Task(command=["sh", "-c", "sleep 300", "x" * 3000], cores=2)
        request = runner_pb2.SubmitTaskRequest(task_id=f"queued-{n}", task=task)
        await runner.stub.SubmitTask(request)
    for args in (["list", "--runner", rest], ["list", "--runner", grpc_, "--json"]):
        result = await _into_head(tmp_path, *args)
        assert result.code == EXIT_BROKEN_PIPE, (args, result)
        assert result.stderr == "", (args, result)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("scheme", ["http", "grpc"])
@pytest.mark.parametrize("verb", ["submit", "status", "capacity", "list"])
async def test_unreachable_runner_is_one_line_and_exit_2(
    verb: str, scheme: str
) -> None:
    url = f"{scheme}://127.0.0.1:{_closed_port()}"
    args = {"submit": ["--", "true"], "status": ["x"]}.get(verb, [])
    result = await daggyr(verb, "--runner", url, *args)
    assert result.code == 2, result
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and url in result.stderr, result
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["submit"], "submit needs a command"),
        (["submit", "--env", "NOEQUALS", "--", "true"], "must be KEY=VALUE"),
        (["submit", "--cores", "many", "--", "true"], "invalid float value"),
        (["status"], "required: task_id"),
        (["list", "--state", "NAPPING"], "invalid choice"),
        (["submit", "--runner", "ftp://x:1", "--", "true"], "scheme 'ftp'"),
        (["capacity", "--runner", "https://h:1", "--ca", "/no/ca.pem"], "ca_file"),
        (["status", "x", "--token-file", "/no/token"], "cannot read token_file"),
        (["submit", "--token", "t", "--token-file", "f", "--", "true"], "not allowed"),
    ],
)
async def test_usage_errors_exit_2(args: list[str], says: str) -> None:
    result = await daggyr(*args)
    assert result.code == 2, result
    assert says in result.stderr
    assert "Traceback" not in result.stderr


async def test_help_documents_the_exit_codes() -> None:
    result = await daggyr("submit", "--help")
    assert result.code == 0
    for line in ("201      TIMED_OUT", "202      OUT_OF_MEMORY", "203      CANCELLED",
                 "204      SYSTEM_ERROR", "128+N", "130/143"):  # fmt: skip
        assert line in result.stdout


async def _until_running(runner: Runner, task_id: str) -> None:
    for _ in range(200):
        listing = await runner.stub.ListTasks(
            runner_pb2.ListTasksRequest(state=[State.RUNNING])
        )
        if any(t.task_id == task_id for t in listing.tasks):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{task_id} never ran")
