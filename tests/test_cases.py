"""The cases in the shared case book, each with the outcome it must have."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path

import grpc
import pytest

from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner, require_cgroups
from .process_helpers import marked_pids


def _seconds(stamp: str) -> float:
    from google.protobuf import timestamp_pb2

    value = timestamp_pb2.Timestamp()
    value.FromJsonString(stamp)
    return value.ToNanoseconds() / 1e9


async def _gone(path: Path, seconds: float = 2) -> bool:
    """Whether ``path`` disappears within ``seconds`` (clean-up follows the result)."""
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return not path.exists()


def cgroup_path(attempt: dict[str, object]) -> str:
    match = re.search(r"^cgroup (\S+)$", str(attempt["executor_log"]), re.M)
    assert match, attempt["executor_log"]
    return match.group(1)


async def test_01_grandchild_holding_stdout(runner: Runner) -> None:
    require_cgroups()
    mark = f"case01-{uuid.uuid4().hex}"
    submitted = time.monotonic()
    status, body = await runner.rest(
        "POST",
        "/api/v1/task/case01-bg",
        {
            "command": ["sh", "-c", "sleep 300 & echo started"],
            "environment": {"DAGGYR_CASE_MARK": mark},
            "memory_mb": 64,
            "timeout_seconds": 60,
        },
    )
    assert status == 200 and body["state"] in ("QUEUED", "RUNNING")
    final = await runner.wait_rest("case01-bg", 20)
    assert time.monotonic() - submitted < 5
    assert final["state"] == "SUCCEEDED"
    assert final["exit_code"] == 0
    assert final["signal"] == 0
    assert final["output_log"] == "started\n"
    assert final["error_log"] == ""
    assert final["output_truncated"] is False
    assert final["oom_killed"] is False
    assert _seconds(final["stop_time"]) - _seconds(final["start_time"]) < 5
    await asyncio.sleep(0.5)
    assert marked_pids(mark, "DAGGYR_CASE_MARK") == []
    assert await _gone(Path(cgroup_path(final)))


async def test_02_timeout_kills_escaped_descendants(
    make_runner: object, tmp_path: Path
) -> None:
    require_cgroups()
    runner: Runner = await make_runner(kill_grace_seconds=2)  # type: ignore[operator]
    work = tmp_path / "w"
    work.mkdir()
    mark = f"case02-{uuid.uuid4().hex}"
    script = (
        "trap '' TERM; setsid sh -c 'while :; do echo beat >> beat.log; "
        "sleep 0.2; done' & sleep 300"
    )
    status, _ = await runner.rest(
        "POST",
        "/api/v1/task/case02-timeout",
        {
            "command": ["sh", "-c", script],
            "working_directory": str(work),
            "environment": {"DAGGYR_CASE_MARK": mark},
            "timeout_seconds": 2,
            "memory_mb": 64,
        },
    )
    assert status == 200
    final = await runner.wait_rest("case02-timeout", 30)
    assert final["state"] == "TIMED_OUT"
    took = _seconds(final["stop_time"]) - _seconds(final["start_time"])
    assert 2.0 <= took <= 7.0
    log = final["executor_log"]
    assert "timeout of 2 s reached" in log
    assert "SIGTERM" in log and "SIGKILL" in log and "grace" in log
    assert marked_pids(mark, "DAGGYR_CASE_MARK") == []
    assert _cwd_inside(work) == []
    size = (work / "beat.log").stat().st_size
    await asyncio.sleep(2)
    assert (work / "beat.log").stat().st_size == size


def _cwd_inside(folder: Path) -> list[int]:
    """Pids whose working directory lies in ``folder``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(folder)):
                found.append(int(pid))
        except OSError:
            continue
    return found


def _disk_dir() -> Path | None:
    for candidate in ("/var/tmp", "/work", "/root"):
        path = Path(candidate)
        if path.is_dir() and os.access(path, os.W_OK):
            with open("/proc/mounts") as mounts:
                for line in mounts:
                    fields = line.split()
                    if fields[1] == "/" and fields[2] not in ("tmpfs", "overlay"):
                        return path
    return None


async def test_04_page_cache_is_not_oom(runner: Runner) -> None:
    require_cgroups()
    base = _disk_dir()
    if base is None:
        pytest.skip("no disk-backed directory found for the page cache case")
    work = base / f"daggyr-case04-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        await runner.rest(
            "POST",
            "/api/v1/task/case04-write",
            {
                "command": [
                    "dd",
                    "if=/dev/zero",
                    "of=big.bin",
                    "bs=1M",
                    "count=256",
                    "conv=fsync",
                ],
                "working_directory": str(work),
                "memory_mb": 64,
            },
        )
        write = await runner.wait_rest("case04-write", 60)
        assert write["state"] == "SUCCEEDED", write
        assert write["exit_code"] == 0
        assert write["oom_killed"] is False
        assert (work / "big.bin").stat().st_size == 268435456

        await runner.rest(
            "POST",
            "/api/v1/task/case04-read",
            {
                "command": [
                    "sh",
                    "-c",
                    "cat big.bin big.bin > /dev/null && echo read-ok",
                ],
                "working_directory": str(work),
                "memory_mb": 64,
            },
        )
        read = await runner.wait_rest("case04-read", 60)
        assert read["state"] == "SUCCEEDED", read
        assert read["output_log"] == "read-ok\n"
        assert read["oom_killed"] is False
        for attempt in (write, read):
            assert "OOM" not in attempt["executor_log"]
            assert "memory limit" not in attempt["executor_log"].replace(
                "memory limit 64", ""
            )
            assert attempt["peak_memory_mb"] <= 65
    finally:
        for item in work.iterdir():
            item.unlink()
        work.rmdir()


async def test_05_long_lines(runner: Runner) -> None:
    await runner.rest(
        "POST",
        "/api/v1/task/case05-long",
        {
            "command": [
                "python3",
                "-c",
                "import sys; sys.stdout.write('x' * 300000); "
                "sys.stderr.write('y' * 200000 + '\\n')",
            ],
            "memory_mb": 256,
        },
    )
    final = await runner.wait_rest("case05-long")
    assert final["state"] == "SUCCEEDED"
    assert final["exit_code"] == 0
    assert final["output_log"] == "x" * 300000
    assert final["error_log"] == "y" * 200000 + "\n"
    assert final["output_truncated"] is False

    await runner.rest(
        "POST",
        "/api/v1/task/case05-huge",
        {
            "command": ["python3", "-c", "import sys; sys.stdout.write('x' * 3000000)"],
            "memory_mb": 256,
        },
    )
    huge = await runner.wait_rest("case05-huge")
    assert huge["state"] == "SUCCEEDED"
    assert huge["output_truncated"] is True
    text = huge["output_log"]
    assert text.startswith("x") and text.endswith("x")
    markers = re.findall(r"\[daggyr: (\d+) bytes dropped\]", text)
    assert len(markers) == 1
    kept = text.count("x")
    assert int(markers[0]) == 3000000 - kept
    marker_len = len(re.search(r"\n\[daggyr: \d+ bytes dropped\]\n", text).group())
    assert len(text.encode()) <= (1 << 20) + marker_len


CASE07 = [
    (
        "case07-a",
        {"command": ["true"], "working_directory": "/nonexistent/case07"},
        "/nonexistent/case07",
        "does not exist",
        "not found",
    ),
    (
        "case07-b",
        {"command": ["/nonexistent/bin/case07"], "working_directory": "/tmp"},
        "/nonexistent/bin/case07",
        "not found",
        "working directory",
    ),
    (
        "case07-c",
        {"command": ["true"], "working_directory": "/etc/hostname"},
        "/etc/hostname",
        "is not a directory",
        "not found",
    ),
    (
        "case07-d",
        {"command": ["/etc/hostname"]},
        "/etc/hostname",
        "is not executable",
        "working directory",
    ),
]


@pytest.mark.parametrize(("task_id", "task", "path", "says", "not_says"), CASE07)
async def test_07_directory_and_command_errors(
    runner: Runner,
    task_id: str,
    task: dict[str, object],
    path: str,
    says: str,
    not_says: str,
) -> None:
    status, _ = await runner.rest("POST", f"/api/v1/task/{task_id}", task)
    assert status == 200
    final = await runner.wait_rest(task_id)
    assert final["state"] == "SYSTEM_ERROR"
    log = final["executor_log"]
    assert path in log and says in log, log
    assert not_says not in log, log
    assert "exit_code" not in final
    assert final["start_time"] and final["stop_time"]
    assert "cgroup " not in log  # nothing was created for a task that cannot start
    _, capacity = await runner.rest("GET", "/api/v1/capacity")
    assert capacity["free"] == capacity["total"]


CASE08 = [
    (
        {"command": ["printenv"], "environment": {"FOO=BAR": "x"}},
        ["environment", "FOO=BAR", "="],
    ),
    ({"command": ["printenv"], "environment": {"": "x"}}, ["environment", "empty key"]),
    (
        {"command": ["printenv"], "environment": {"A": "x\u0000y"}},
        ["environment['A']", "NUL"],
    ),
    ({"command": ["echo", "a\u0000b"]}, ["command[1]", "NUL"]),
    (
        {"command": ["true"], "working_directory": "/tmp\u0000x"},
        ["working_directory", "NUL"],
    ),
]


@pytest.mark.parametrize(("number", "case"), list(enumerate(CASE08, start=1)))
async def test_08_execve_refusals(
    runner: Runner, number: int, case: tuple[dict[str, object], list[str]]
) -> None:
    task, named = case
    _, before = await runner.rest("GET", "/api/v1/capacity")
    status, body = await runner.rest("POST", f"/api/v1/task/case08-{number}", task)
    assert status == 400
    assert body["code"] == 3
    for word in named:
        assert word in body["message"], body

    message = task_pb2.Task(
        command=task["command"],
        environment=task.get("environment", {}),
        working_directory=task.get("working_directory", ""),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runner.stub.SubmitTask(
            runner_pb2.SubmitTaskRequest(task_id=f"case08-g{number}", task=message)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == body["message"]

    status, body = await runner.rest("GET", f"/api/v1/task/case08-{number}")
    assert status == 404 and body["code"] == 5
    _, after = await runner.rest("GET", "/api/v1/capacity")
    assert after == before


async def test_09_tiny_cpu_quota(runner: Runner) -> None:
    require_cgroups()
    for task_id, cores in (("case09-tiny", 0.005), ("case09-tinier", 0.0001)):
        status, body = await runner.rest(
            "POST",
            f"/api/v1/task/{task_id}",
            {"command": ["sleep", "1"], "cores": cores},
        )
        assert status == 200, body
        await asyncio.sleep(0.3)
        _, running = await runner.rest("GET", f"/api/v1/task/{task_id}")
        path = Path(cgroup_path(running))
        cpu_dir = Path(str(path).replace("/memory/", "/cpu/"))
        if (cpu_dir / "cpu.cfs_quota_us").exists():
            quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
            period = int((cpu_dir / "cpu.cfs_period_us").read_text())
        else:
            quota_s, period_s = (path / "cpu.max").read_text().split()
            quota, period = int(quota_s), int(period_s)
        assert quota >= 1000
        assert quota / period >= cores
        final = await runner.wait_rest(task_id)
        assert final["state"] == "SUCCEEDED" and final["exit_code"] == 0
        assert "kernel minimum" in final["executor_log"]
        assert await _gone(path)


async def test_10_peak_memory_v1_or_v2(runner: Runner) -> None:
    require_cgroups()
    await runner.rest(
        "POST",
        "/api/v1/task/case10-peak",
        {
            "command": [
                "python3",
                "-c",
                "import time; x = b'x' * (300 << 20); time.sleep(2)",
            ],
            "memory_mb": 1024,
        },
    )
    final = await runner.wait_rest("case10-peak")
    assert final["state"] == "SUCCEEDED" and final["exit_code"] == 0
    assert final["oom_killed"] is False
    assert 300 <= final["peak_memory_mb"] <= 400
    assert final["cpu_seconds"] > 0


async def test_11_slash_in_rest_path(runner: Runner) -> None:
    status, body = await runner.rest(
        "POST", "/api/v1/task/run-42/extract", {"command": ["sleep", "30"]}
    )
    assert status == 200 and body["task_id"] == "run-42/extract"
    status, body = await runner.rest(
        "POST", "/api/v1/task/run-42", {"command": ["true"]}
    )
    assert status == 200 and body["task_id"] == "run-42"
    await asyncio.sleep(0.2)

    seen = []
    for path in ("run-42/extract", "run-42%2Fextract", "run-42%2fextract"):
        status, body = await runner.rest("GET", f"/api/v1/task/{path}")
        assert status == 200, body
        assert body["task_id"] == "run-42/extract"
        seen.append(body["start_time"])
    assert len(set(seen)) == 1
    status, body = await runner.rest("GET", "/api/v1/task/run-42")
    assert status == 200 and body["task_id"] == "run-42"

    status, body = await runner.rest("POST", "/api/v1/task/run-42%2Fextract:cancel", {})
    assert status == 200 and body["task_id"] == "run-42/extract"
    assert body["state"] == "CANCELLED"
    _, other = await runner.rest("GET", "/api/v1/task/run-42")
    assert other["state"] == "SUCCEEDED"

    status, listing = await runner.rest("GET", "/api/v1/task")
    assert "run-42/extract" in [t["task_id"] for t in listing["tasks"]]

    status, body = await runner.rest("GET", "/api/v1/task/run-42/")
    assert status == 400 and body["code"] == 3

    status, _ = await runner.rest("DELETE", "/api/v1/task/run-42/extract")
    assert status == 200
    status, body = await runner.rest("GET", "/api/v1/task/run-42/extract")
    assert status == 404 and body["code"] == 5


def _listing(runner: Runner) -> dict[str, list[str]]:
    """Parent directories of daggyr's cgroup roots and temp root."""
    parents = {Path(runner.server.config.temp_root or "/tmp").parent}
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        if hierarchy.is_dir():
            parents.add(hierarchy)
    own = runner.cgroup_root

    def relevant(name: str) -> bool:
        # Other runners (parallel test processes) come and go beside ours;
        # everything else in these directories must stay exactly as it was.
        return name == own or not name.startswith("daggyr")

    return {str(p): sorted(filter(relevant, os.listdir(p))) for p in parents}


REFUSED = ["..", ".", "a/../../escape", "a/./b", "a//b", "/a", "a/"]
ACCEPTED = ["a/b", "a.b", "..a", "a..", "a/b.c/d", "~a:b-c_d"]


async def test_13_dot_segments(runner: Runner) -> None:
    require_cgroups()
    body = {
        "command": ["sh", "-c", 'cat /proc/self/cgroup; echo "TMP=$TMPDIR"'],
        "memory_mb": 64,
    }
    before = _listing(runner)
    for task_id in REFUSED:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runner.stub.SubmitTask(
                runner_pb2.SubmitTaskRequest(
                    task_id=task_id, task=task_pb2.Task(command=body["command"])
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "task_id" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runner.stub.GetTask(runner_pb2.GetTaskRequest(task_id=task_id))
        assert caught.value.code() in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    for raw in [*REFUSED, "%2E%2E"]:
        if raw.startswith("/"):
            raw = "/" + raw  # '/a' as an id: an empty first segment
        status, reply = await runner.rest("POST", f"/api/v1/task/{raw}", body)
        assert status == 400, (raw, reply)
        assert reply["code"] == 3 and "task_id" in reply["message"]
    _, capacity = await runner.rest("GET", "/api/v1/capacity")
    assert capacity["free"] == capacity["total"] and capacity["queued_tasks"] == 0
    assert _listing(runner) == before

    tmps = set()
    root = runner.cgroup_root
    for task_id in ACCEPTED:
        status, reply = await runner.rest("POST", f"/api/v1/task/{task_id}", body)
        assert status == 200, (task_id, reply)
        final = await runner.wait_rest(task_id)
        assert final["state"] == "SUCCEEDED", final
        lines = final["output_log"].splitlines()
        for line in lines[:-1]:
            controller_path = line.split(":", 2)[2]
            controllers = set(line.split(":")[1].split(","))
            if controllers & {"memory", "cpu", "cpuacct", "pids", "freezer"}:
                assert controller_path.startswith(f"/{root}/"), line
        tmp = lines[-1].removeprefix("TMP=")
        assert tmp.startswith(str(runner.server.config.temp_root) + "/")
        tmps.add(tmp)
    assert len(tmps) == len(ACCEPTED)
    _, listing = await runner.rest("GET", "/api/v1/task")
    assert [t["task_id"] for t in listing["tasks"]] == ACCEPTED
    assert _listing(runner) == before


async def test_15_long_poll_timeout_does_not_cancel(runner: Runner) -> None:
    import aiohttp

    start = time.monotonic()
    await runner.rest(
        "POST", "/api/v1/task/case15", {"command": ["sh", "-c", "sleep 3; echo done"]}
    )
    await asyncio.sleep(0.1)

    async def timed(coro: object) -> tuple[float, object]:
        result = await coro  # type: ignore[misc]
        return time.monotonic() - start, result

    async def closes_early() -> None:
        session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(0.5):
                await session.get(f"{runner.base}/api/v1/task/case15?wait_seconds=10")
        except TimeoutError:
            pass
        finally:
            await session.close()

    async def watch_cancelled() -> None:
        call = runner.stub.WatchTask(runner_pb2.WatchTaskRequest(task_id="case15"))
        await asyncio.sleep(0.5)
        call.cancel()

    async def deadline() -> grpc.StatusCode:
        try:
            await runner.stub.GetTask(
                runner_pb2.GetTaskRequest(task_id="case15", wait_seconds=10),
                timeout=0.5,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    a, b, _, _, e = await asyncio.gather(
        timed(runner.rest("GET", "/api/v1/task/case15?wait_seconds=1")),
        timed(runner.rest("GET", "/api/v1/task/case15?wait_seconds=10")),
        closes_early(),
        watch_cancelled(),
        deadline(),
    )
    a_time, (a_status, a_body) = a
    assert a_status == 200 and a_body["state"] == "RUNNING"
    assert 1.0 <= a_time - 0.1 <= 1.6
    b_time, (b_status, b_body) = b
    assert b_status == 200 and b_body["state"] == "SUCCEEDED"
    assert 2.8 <= b_time <= 4.5
    assert b_body["exit_code"] == 0 and b_body["output_log"] == "done\n"
    assert e == grpc.StatusCode.DEADLINE_EXCEEDED

    quick = time.monotonic()
    final = await runner.wait_rest("case15", 10)
    assert time.monotonic() - quick < 0.5
    assert final["state"] == "SUCCEEDED"
    attempts = [
        a
        async for a in runner.stub.WatchTask(
            runner_pb2.WatchTaskRequest(task_id="case15")
        )
    ]
    assert [a.state for a in attempts] == [task_pb2.SUCCEEDED]
