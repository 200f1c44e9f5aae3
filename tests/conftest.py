"""Shared fixtures: real runners on port 0, and clients of both protocols."""

from __future__ import annotations

import asyncio
import io
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from daggyr.config import Config
from daggyr.server import Server
from daggyr.v1 import runner_pb2_grpc

CGROUP_MOUNT = Path("/sys/fs/cgroup")
IS_ROOT = os.geteuid() == 0


def cgroups_writable() -> str | None:
    """None when this host can run the cgroup tests, else why not."""
    if not IS_ROOT:
        return "needs root to create cgroups"
    if (
        not (CGROUP_MOUNT / "memory").is_dir()
        and not (CGROUP_MOUNT / "cgroup.controllers").exists()
    ):
        return "no cgroup v1 memory hierarchy and no cgroup v2 mount"
    return None


def require_cgroups() -> None:
    """Skip where cgroups cannot be used; as root that is a failure, not a skip."""
    why = cgroups_writable()
    if why is None:
        return
    if IS_ROOT:
        pytest.fail(f"running as root but cgroups are unusable: {why}")
    pytest.skip(why)


def leftover_cgroups(prefix: str) -> list[str]:
    """Directories named ``prefix*`` in any mounted hierarchy."""
    found = []
    if CGROUP_MOUNT.is_dir():
        for hierarchy in CGROUP_MOUNT.iterdir():
            if hierarchy.is_dir():
                found += [str(p) for p in hierarchy.glob(prefix + "*")]
    return found


class Runner:
    """A started server and clients of both protocols pointed at it."""

    def __init__(self, server: Server, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.base = f"http://127.0.0.1:{server.rest_port}"
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        self.stub = runner_pb2_grpc.RunnerStub(self.channel)

    @property
    def cgroup_root(self) -> str:
        return self.server.config.cgroup_root

    async def rest(
        self, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """One REST call; the path is sent exactly as written."""
        url = aiohttp.client.URL(self.base + path, encoded=True)
        data: Any = None
        if body is not None:
            if isinstance(body, str):
                body = body.encode()
            elif not isinstance(body, bytes):
                body = json.dumps(body).encode()
            data = io.BytesIO(body)  # streamed, so big bodies are not copied
        async with self.http.request(method, url, data=data, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def wait_rest(self, task_id: str, seconds: int = 30) -> dict[str, Any]:
        status, body = await self.rest(
            "GET", f"/api/v1/task/{task_id}?wait_seconds={seconds}"
        )
        assert status == 200, body
        return body


@pytest.fixture
async def make_runner(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Runner]]]:
    started: list[Runner] = []
    http = aiohttp.ClientSession()
    prefix = f"daggyr-test-{uuid.uuid4().hex[:8]}"

    async def make(**settings: Any) -> Runner:
        data: dict[str, Any] = {
            "port": 0,
            "grpc-port": 0,
            "cgroup_root": f"{prefix}-{len(started)}",
            "temp_root": str(tmp_path / f"tasks-{len(started)}"),
            "capacity_overrides": {"cores": 2, "memory_mb": 4096},
            "kill_grace_seconds": 2,
        }
        data.update(settings)
        server = Server(Config.model_validate(data))
        await server.start()
        runner = Runner(server, http)
        started.append(runner)
        return runner

    yield make
    for runner in started:
        await runner.channel.close()
        await runner.server.stop()
    await http.close()
    await asyncio.sleep(0)
    assert leftover_cgroups(prefix) == [], "cgroups left behind"


@pytest.fixture
async def runner(make_runner: Callable[..., Awaitable[Runner]]) -> Runner:
    return await make_runner()


_BEFORE: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _BEFORE.update(leftover_cgroups("daggyr-test"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole run leaves no cgroup of daggyr's behind, whichever test made it."""
    # Every test names its cgroup roots daggyr-test-*; runners outside this
    # run (on a shared machine) may come and go beside them.
    left = sorted(set(leftover_cgroups("daggyr-test")) - _BEFORE)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"FAILED: cgroups left behind by the run: {left}")
