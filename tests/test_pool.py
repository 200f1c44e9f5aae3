"""Runner selection: the rule alone, then a pool of real runners."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from fractions import Fraction
from pathlib import Path

import aiohttp
import pytest

from daggyr.client import Client
from daggyr.errors import FailedPrecondition, Unavailable
from daggyr.pool import (
    NoRunnerFits,
    Placement,
    RunnerPool,
    RunnerVanished,
    choose,
    impact,
    task_needs,
)
from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner, leftover_cgroups
from .process_helpers import alive

State = task_pb2.State
Capacity = task_pb2.Capacity
GB = 1024


# -- the rule ----------------------------------------------------------------------


def test_readme_worked_example() -> None:
    """2 cores and 5g against 70/20g, 4/80g and 10/30g goes to the third."""
    needs = Capacity(cores=2, memory_mb=5 * GB)
    runners = [
        Capacity(cores=70, memory_mb=20 * GB),
        Capacity(cores=4, memory_mb=80 * GB),
        Capacity(cores=10, memory_mb=30 * GB),
    ]
    assert [impact(needs, free) for free in runners] == [
        Fraction(25, 100),  # max(2.86% of cores, 25% of memory)
        Fraction(50, 100),  # max(50%, 6.25%)
        Fraction(20, 100),  # max(20%, 16.67%)
    ]
    assert choose(needs, runners) == 2


def test_ties_most_free_cores_then_memory_then_order() -> None:
    needs = Capacity(cores=1, memory_mb=100)
    # Both 50%: the one with more free cores wins, wherever it is listed.
    assert (
        choose(
            needs, [Capacity(cores=2, memory_mb=1000), Capacity(cores=4, memory_mb=200)]
        )
        == 1
    )
    assert (
        choose(
            needs, [Capacity(cores=4, memory_mb=200), Capacity(cores=2, memory_mb=1000)]
        )
        == 0
    )
    # Both 25% with 4 cores free: more free memory wins.
    assert (
        choose(
            needs, [Capacity(cores=4, memory_mb=400), Capacity(cores=4, memory_mb=800)]
        )
        == 1
    )
    # Identical: the first listed.
    same = Capacity(cores=3, memory_mb=300)
    assert choose(needs, [same, same, same]) == 0
    # Exactly what is free still fits; a lower impact still beats the ties.
    assert (
        choose(
            needs, [Capacity(cores=1, memory_mb=100), Capacity(cores=8, memory_mb=150)]
        )
        == 1
    )
    assert choose(needs, [Capacity(cores=1, memory_mb=100)]) == 0


def test_no_fit_names_resource_and_shortfall() -> None:
    needs = Capacity(cores=2, memory_mb=5 * GB)
    runners = [
        Capacity(cores=1, memory_mb=10 * GB),  # half the cores missing
        Capacity(cores=8, memory_mb=4 * GB),  # a fifth of the memory missing
    ]
    with pytest.raises(NoRunnerFits) as caught:
        choose(needs, runners, ["http://a:1", "http://b:2"])
    error = caught.value
    assert isinstance(error, FailedPrecondition)
    assert (error.runner, error.resource, error.shortfall) == (
        "http://b:2",
        "memory_mb",
        1024,
    )
    assert "the closest, http://b:2, is 1024 MiB short of memory_mb" in str(error)
    assert "2 cores and 5120 MiB" in str(error)

    with pytest.raises(NoRunnerFits, match=r"runner 1, is 1\.5 cores short of cores"):
        choose(Capacity(cores=2, memory_mb=1), [Capacity(cores=0.5, memory_mb=10)])
    with pytest.raises(NoRunnerFits, match="no runner"):
        choose(needs, [])


def test_unset_figures_are_the_runner_defaults() -> None:
    assert task_needs(task_pb2.Task(command=["x"])) == Capacity(cores=1, memory_mb=512)
    assert task_needs(task_pb2.Task(cores=0.5, memory_mb=64)) == Capacity(
        cores=0.5, memory_mb=64
    )


# -- a pool of real runners -------------------------------------------------------


def reference_choice(
    needs: Capacity, reports: dict[str, task_pb2.CapacityReport]
) -> str:
    """The rule written out again, plainly, to check the pool against."""
    best: tuple[float, float, int, int] | None = None
    chosen = ""
    for order, (url, report) in enumerate(reports.items()):
        free = report.free
        if needs.cores > free.cores or needs.memory_mb > free.memory_mb:
            continue
        key = (
            max(needs.cores / free.cores, needs.memory_mb / free.memory_mb),
            -free.cores,
            -free.memory_mb,
            order,
        )
        if best is None or key < best:
            best, chosen = key, url
    return chosen


async def test_pool_places_forty_tasks_by_the_rule(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    sizes = [(1, 512), (2, 1024), (4, 2048)]
    runners = [
        await make_runner(capacity_overrides={"cores": c, "memory_mb": m})
        for c, m in sizes
    ]
    urls = [f"http://127.0.0.1:{r.server.rest_port}" for r in runners]
    urls[1] = f"grpc://127.0.0.1:{runners[1].server.grpc_port}"  # mixed protocols
    by_url = dict(zip(urls, runners, strict=True))
    rng = random.Random(42)
    placements: list[Placement] = []
    waits: list[asyncio.Future[task_pb2.TaskAttempt]] = []

    async with RunnerPool(urls) as pool:
        for number in range(40):
            task = task_pb2.Task(
                command=rng.choice([["true"], ["sleep", "0.2"]]),
                cores=rng.choice([0.25, 0.5, 1.0]),
                memory_mb=rng.choice([32, 64, 128, 256]),
            )
            while True:
                try:
                    placement = await pool.place(f"mixed-{number}", task)
                    break
                except NoRunnerFits:
                    # Every runner is busy: let a task finish, then retry.
                    pending = [w for w in waits if not w.done()]
                    if pending:
                        await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                    await asyncio.sleep(0.05)
            placements.append(placement)
            waits.append(
                asyncio.ensure_future(placement.client.wait(placement.task_id))
            )
            assert placement.survey.unreachable == {}
            assert placement.runner == reference_choice(
                placement.needs, placement.survey.reports
            )
            held = await by_url[placement.runner].stub.GetTask(
                runner_pb2.GetTaskRequest(task_id=placement.task_id)
            )
            assert held.task.cores == task.cores
        finals = await asyncio.gather(*waits)

    assert [f.state for f in finals] == [State.SUCCEEDED] * 40
    used = Counter(p.runner for p in placements)
    assert len(used) >= 2, used
    # The biggest runner takes the most: its share of any task is the smallest.
    assert used.most_common(1)[0][0] == urls[2], used


async def test_run_returns_the_final_attempt(runner: Runner) -> None:
    url = f"http://127.0.0.1:{runner.server.rest_port}"
    seen: list[task_pb2.TaskAttempt] = []
    async with RunnerPool([url, f"http://127.0.0.1:{free_port()}"]) as pool:
        final = await pool.run(
            "run-1", task_pb2.Task(command=["echo", "done"]), on_change=seen.append
        )
        assert final.state == State.SUCCEEDED and final.output_log == "done\n"
        assert seen[-1] == final
        with pytest.raises(NoRunnerFits, match="short of cores"):
            await pool.run("too-big", task_pb2.Task(command=["true"], cores=3))


async def test_no_runner_answers() -> None:
    async with RunnerPool([f"grpc://127.0.0.1:{free_port()}"]) as pool:
        with pytest.raises(Unavailable, match="no runner answered"):
            await pool.run("lost", task_pb2.Task(command=["true"]))


# -- a runner that vanishes -------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunnerProcess:
    """A runner in its own process, so that it can be killed outright."""

    def __init__(self, tmp_path: Path, cgroup_root: str) -> None:
        self.tmp_path = tmp_path
        self.cgroup_root = cgroup_root
        self.process: asyncio.subprocess.Process | None = None
        self.rest_port = self.grpc_port = 0

    async def start(self) -> None:
        self.rest_port, self.grpc_port = free_port(), free_port()
        config = self.tmp_path / "runner.json"
        config.write_text(
            json.dumps(
                {
                    "temp_root": str(self.tmp_path / "tasks"),
                    "capacity_overrides": {"cores": 8, "memory_mb": 8192},
                    "kill_grace_seconds": 1,
                }
            )
        )
        log = open(self.tmp_path / "runner.log", "ab")  # noqa: SIM115
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daggyr.cli",
            "--config",
            str(config),
            "--port",
            str(self.rest_port),
            "--grpc-port",
            str(self.grpc_port),
            "--cgroup-root",
            self.cgroup_root,
            stdout=log,
            stderr=log,
        )
        log.close()
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(
                        f"http://127.0.0.1:{self.rest_port}/ready"
                    ) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert self.process.returncode is None, self.log()
                await asyncio.sleep(0.1)
        raise AssertionError(f"runner did not become ready: {self.log()}")

    def log(self) -> str:
        return (self.tmp_path / "runner.log").read_text()

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), 30)


@pytest.fixture
async def runner_process(tmp_path: Path) -> AsyncIterator[RunnerProcess]:
    prefix = f"daggyr-test-{uuid.uuid4().hex[:8]}"
    process = RunnerProcess(tmp_path, f"{prefix}-killed")
    yield process
    if process.process is not None and process.process.returncode is None:
        await process.stop(signal.SIGKILL)
    # A runner killed outright leaves its cgroups; its next start removes them.
    await process.start()
    assert await process.stop() == 0, process.log()
    assert leftover_cgroups(prefix) == [], "cgroups left behind"


@pytest.mark.parametrize("scheme", ["http", "grpc"])
async def test_runner_killed_mid_task(
    runner_process: RunnerProcess,
    make_runner: Callable[..., Awaitable[Runner]],
    scheme: str,
) -> None:
    await runner_process.start()
    doomed = (
        f"grpc://127.0.0.1:{runner_process.grpc_port}"
        if scheme == "grpc"
        else f"http://127.0.0.1:{runner_process.rest_port}"
    )
    survivor = await make_runner(capacity_overrides={"cores": 1, "memory_mb": 512})
    survivor_url = f"http://127.0.0.1:{survivor.server.rest_port}"

    async with RunnerPool([survivor_url, doomed]) as pool:
        task = task_pb2.Task(command=["sleep", "30"], memory_mb=64)
        running = asyncio.ensure_future(pool.run("doomed-1", task))
        async with Client(doomed) as direct:
            for _ in range(100):
                try:
                    attempt = await direct.get("doomed-1")
                    if attempt.state == State.RUNNING:
                        break
                except Exception:
                    pass
                await asyncio.sleep(0.1)
        assert attempt.state == State.RUNNING
        pid = int(attempt.executor_log.split("started pid ")[1].split()[0])
        assert alive(pid)

        assert await runner_process.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(RunnerVanished) as caught:
            await asyncio.wait_for(running, 30)
        assert (caught.value.runner_url, caught.value.task_id) == (doomed, "doomed-1")
        assert isinstance(caught.value, Unavailable)
        assert doomed in str(caught.value) and "outcome is unknown" in str(caught.value)

        # The task's process dies with its runner (parent-death signal).
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not alive(pid)

        # The pool carries on with the runner that is left.
        after = await pool.place("after-1", task_pb2.Task(command=["echo", "ok"]))
        assert after.runner == survivor_url
        assert doomed in after.survey.unreachable
        final = await after.client.wait("after-1", timeout=30)
        assert final.state == State.SUCCEEDED and final.output_log == "ok\n"


# -- a submission whose reply is lost ----------------------------------------------


class DroppingProxy:
    """Forwards TCP to a port, but cuts the connection carrying the first
    submission (a POST) as its reply starts, so the reply is lost."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self.posts = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        # Requests on one connection are answered in order, so the first reply
        # after the first POST is that POST's.
        doomed = asyncio.Event()

        async def requests() -> None:
            while data := await reader.read(65536):
                if data.startswith(b"POST "):
                    self.posts += 1
                    if self.posts == 1:
                        doomed.set()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                if doomed.is_set() and not self.dropped:
                    self.dropped += 1
                    writer.transport.abort()
                    up_writer.close()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(requests(), replies(), return_exceptions=True)


async def test_lost_reply_is_retried_once(runner: Runner) -> None:
    proxy = DroppingProxy(runner.server.rest_port)
    port = await proxy.start()
    try:
        async with RunnerPool([f"http://127.0.0.1:{port}"]) as pool:
            placement = await pool.place(
                "lost-reply", task_pb2.Task(command=["echo", "once"])
            )
            final = await placement.client.wait("lost-reply", timeout=30)
    finally:
        await proxy.stop()
    assert proxy.dropped == 1 and proxy.posts == 2 and proxy.connections >= 2
    assert final.state == State.SUCCEEDED and final.output_log == "once\n"
    listing = await runner.stub.ListTasks(runner_pb2.ListTasksRequest())
    assert [t.task_id for t in listing.tasks] == ["lost-reply"]


def test_pool_needs_runners() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RunnerPool([])
