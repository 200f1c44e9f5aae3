"""A runner in its own process (``python -m daggyr.cli``), for what needs one.

Signals, start-up refusals and the runner's own memory are only observable from
outside its process; everything else is tested in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

__all__ = ["Spawned", "spawned_runner", "vm_peak_kib"]

_REST = re.compile(r"REST listening on https?://\S+:(\d+)")
_GRPC = re.compile(r"gRPC listening on \S+:(\d+)")


class Spawned:
    """A started runner process; its log is the file ``log``."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.rest_port = 0
        self.grpc_port = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, pattern: str, count: int = 1, seconds: float = 30) -> str:
        """The log once ``pattern`` (a regex) appears ``count`` times in it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            text = self.text()
            if len(re.findall(pattern, text)) >= count:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"runner exited {self.proc.returncode}:\n{text}")
            if loop.time() > deadline:
                raise AssertionError(f"{pattern!r} not logged in {seconds} s:\n{text}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, seconds: float = 30) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.proc.poll() is None:
            if loop.time() > deadline:
                raise AssertionError(f"runner still running after {seconds} s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        """SIGTERM the runner (by its pid) if it still runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)


@asynccontextmanager
async def spawned_runner(
    tmp_path: Path,
    settings: dict[str, Any] | None = None,
    args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    wait: bool = True,
) -> AsyncIterator[Spawned]:
    """Start ``daggyr --config FILE ARGS`` (behind ``wrapper``), stop it after.

    With ``wait`` the ports are read back from the start-up log; without, the
    caller inspects the process and its log itself.
    """
    name = f"daggyr-test-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    config = {
        "port": 0,
        "grpc-port": 0,
        "cgroup_root": name,
        "temp_root": str(folder / "tasks"),
        "capacity_overrides": {"cores": 2, "memory_mb": 1024},
        "kill_grace_seconds": 1,
        **(settings or {}),
    }
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(config))
    log = folder / "runner.log"
    command = [*wrapper, sys.executable, "-m", "daggyr.cli", "--config"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*command, str(config_file), *args],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    spawned = Spawned(proc, log)
    try:
        if wait:
            text = await spawned.wait_for(r"gRPC listening on")
            spawned.rest_port = int(_REST.findall(text)[0])
            spawned.grpc_port = int(_GRPC.findall(text)[0])
        yield spawned
    finally:
        spawned.stop()
        try:
            await spawned.wait_exit()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def vm_peak_kib(pid: int) -> int:
    """The highest resident set size ``pid`` has had so far (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")
