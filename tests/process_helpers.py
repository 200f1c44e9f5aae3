"""The real ``daggyr`` command run as a subprocess, and what it leaves behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

DAGGYR = str(Path(sys.executable).with_name("daggyr"))
MARKER_NAME = "DAGGYR_TEST_MARKER"


def free_port() -> int:
    """A port nothing listens on right now (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def unique_root() -> str:
    return f"daggyr-test-{uuid.uuid4().hex[:8]}"


def write_config(directory: Path, **settings: Any) -> tuple[Path, dict[str, Any]]:
    """A config file on port 0, a unique cgroup_root and a temp_root inside."""
    data: dict[str, Any] = {
        "port": 0,
        "grpc-port": 0,
        "cgroup_root": unique_root(),
        "temp_root": str(directory / "tasks"),
        "capacity_overrides": {"cores": 2, "memory_mb": 4096},
        "kill_grace_seconds": 2,
    }
    data.update(settings)
    path = directory / "config.json"
    path.write_text(json.dumps(data))
    return path, data


def wait_until(what: str, check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def marked_pids(marker: str, name: str = MARKER_NAME) -> list[int]:
    """Live processes whose environment carries ``name=marker``."""
    wanted = f"{name}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if wanted in environ.read().split(b"\0") and alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def processes_with_argument(argument: str) -> list[int]:
    """Live processes with ``argument`` in their command line."""
    wanted = argument.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if wanted in cmdline.read().split(b"\0") and alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def cgroup_dirs(root: str) -> list[str]:
    """Every directory of ``root`` (and below) in any mounted hierarchy.

    cgroup v2 has the root right under /sys/fs/cgroup; v1 one per hierarchy.
    """
    found = []
    base = Path("/sys/fs/cgroup")
    hierarchies = [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
    for top in [base / root] + [h / root for h in hierarchies]:
        if top.is_dir():
            found.append(str(top))
            found += [str(p) for p in top.iterdir() if p.is_dir()]
    return found


def task_cgroups(root: str) -> list[str]:
    """The task cgroups under ``root``: its subdirectories in any hierarchy."""
    return [d for d in cgroup_dirs(root) if Path(d).name != root]


def http(
    port: int, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any] | str]:
    """One REST call to 127.0.0.1:port; the decoded JSON body or the text."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def ready(port: int) -> bool:
    try:
        return http(port, "GET", "/ready")[0] == 200
    except OSError:
        return False


def grpc_health(port: int) -> str:
    """The overall status the standard health service reports."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def ports_in(text: str) -> tuple[int, int]:
    """The (REST, gRPC) ports a runner said it listens on, in its log or -d's line."""
    rest = re.search(r"REST (?:listening )?on https?://[^ ]+:(\d+)", text)
    grpc = re.search(r"gRPC (?:listening )?on [^ ]+:(\d+)", text)
    assert rest and grpc, text
    return int(rest.group(1)), int(grpc.group(1))


class Foreground:
    """``daggyr --config FILE`` in the foreground, its log in a file."""

    rest_port = grpc_port = 0

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [DAGGYR, "--config", str(config), *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        """Wait until both ports are logged and /ready answers 200."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daggyr exited early:\n{self.log()}")
            if "gRPC listening on" not in self.log():
                return False
            self.rest_port, self.grpc_port = ports_in(self.log())
            return ready(self.rest_port)

        wait_until("daggyr to answer /ready", up)

    def close(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()


def submit(port: int, task_id: str, command: list[str], marker: str) -> None:
    status, body = http(
        port,
        "POST",
        f"/api/v1/task/{task_id}",
        {
            "command": command,
            "cores": 0.5,
            "memory_mb": 64,
            "environment": {MARKER_NAME: marker},
        },
    )
    assert status == 200, body


def state(port: int, task_id: str) -> str:
    status, body = http(port, "GET", f"/api/v1/task/{task_id}")
    assert status == 200 and isinstance(body, dict), body
    return str(body["state"])


def kill_by_pid(pids: list[int]) -> None:
    """Clean-up after a failed test: SIGKILL what is left of what it started."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
