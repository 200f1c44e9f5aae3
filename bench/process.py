"""A real runner for the benchmark: the ``daggyr`` command as a subprocess.

Each runner gets its own JSON config, free loopback ports, a cgroup root named
``daggyr-bench-<random>`` and a temporary tree under the benchmark's directory.
It is stopped with SIGTERM, as an operator would, and its resident memory and
CPU time are read from outside with psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.clients import GrpcClient, RestClient

__all__ = ["RunnerProcess", "leftover_cgroups"]

CGROUP_MOUNT = Path("/sys/fs/cgroup")
_READY_SECONDS = 30.0
_STOP_SECONDS = 60.0


class RunnerProcess:
    """One ``daggyr --config FILE`` process and a client of each protocol.

    With ``cgroups=False`` the runner's cgroup root is an absolute path under no
    cgroup2 mount, which the cgroup layer cannot use: it runs with enforcement
    "none", the only way to switch cgroups off by configuration.
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        cgroups: bool = True,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir / name
        self.cgroup_root = name if cgroups else f"/nonexistent/{name}"
        self.settings = settings or {}
        self.pid = 0
        self.enforcement = ""
        self.grpc: GrpcClient | None = None
        self.rest: RestClient | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None

    async def start(self) -> None:
        """Start the runner and return once it answers /ready; raises if it cannot."""
        self.workdir.mkdir(parents=True)
        rest_port, grpc_port = _free_ports(2)
        config = {
            "port": rest_port,
            "grpc-port": grpc_port,
            "cgroup_root": self.cgroup_root,
            "temp_root": str(self.workdir / "tasks"),
            "capacity_overrides": {"cores": 2, "memory_mb": 8192},
            "max_queued_tasks": 100_000,
            **self.settings,
        }
        config_path = self.workdir / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        self.log_path = self.workdir / "runner.log"
        with open(self.log_path, "wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("daggyr")),
                "--config",
                str(config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.pid = self._proc.pid
        self._ps = psutil.Process(self.pid)
        await self._wait_ready(rest_port)
        self.grpc = GrpcClient(grpc_port)
        self.rest = RestClient(rest_port)

    def rss(self) -> int:
        """The runner's resident set size in bytes, now."""
        assert self._ps is not None
        return int(self._ps.memory_info().rss)

    def cpu_seconds(self) -> float:
        """CPU time of the runner process itself (not its tasks), all threads.

        Read from each thread's schedstat, in nanoseconds: psutil's user plus
        system time counts in clock ticks (10 ms), too coarse for an idle
        runner over a few seconds. A thread that exits takes its time with it.
        """
        assert self._ps is not None
        total = 0
        try:
            for thread in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    total += int((thread / "schedstat").read_text().split()[0])
        except OSError:
            times = self._ps.cpu_times()
            return float(times.user + times.system)
        return total / 1e9

    async def stop(self) -> list[str]:
        """SIGTERM, wait for the runner to finish; returns cgroups it left behind."""
        for client in (self.grpc, self.rest):
            if client is not None:
                await client.close()
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), _STOP_SECONDS)
            except TimeoutError:
                os.kill(self.pid, signal.SIGKILL)
                await self._proc.wait()
        return leftover_cgroups(self.cgroup_root)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def _wait_ready(self, rest_port: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _READY_SECONDS
        url = f"http://127.0.0.1:{rest_port}"
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self._proc.returncode is not None:
                    break
                try:
                    async with http.get(url + "/ready") as reply:
                        if reply.status == 200:
                            async with http.get(url + "/api/v1/capacity") as cap:
                                self.enforcement = (await cap.json())["enforcement"]
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the runner did not become ready:\n{self.log_tail()}")


def leftover_cgroups(root_name: str) -> list[str]:
    """Directories named ``root_name`` left on the v2 mount or in a v1 hierarchy."""
    if os.path.isabs(root_name) or not CGROUP_MOUNT.is_dir():
        return []
    places = [CGROUP_MOUNT, *(p for p in CGROUP_MOUNT.iterdir() if p.is_dir())]
    return [str(p / root_name) for p in places if (p / root_name).is_dir()]


def _free_ports(count: int) -> list[int]:
    """Ports the kernel picks as free now; held open together so they differ."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    try:
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
