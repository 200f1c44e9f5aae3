"""``daggyr -d``: returns once both ports listen, or fails saying why."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .process_helpers import (
    DAGGYR,
    alive,
    cgroup_dirs,
    grpc_health,
    http,
    kill_by_pid,
    ports_in,
    processes_with_argument,
    wait_until,
    write_config,
)


def _daggyr(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAGGYR, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def _pid_in(pidfile: Path) -> int:
    return int(pidfile.read_text().strip())


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_until(f"daemon pid {pid} to exit", lambda: not alive(pid), 30)


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Pids of daemons a test started; any still running is killed after it."""
    started: list[int] = []
    yield started
    kill_by_pid([pid for pid in started if alive(pid)])


def test_daemon_returns_once_both_ports_answer(
    tmp_path: Path, daemons: list[int]
) -> None:
    config, data = write_config(tmp_path)
    pidfile, log = tmp_path / "daggyr.pid", tmp_path / "daggyr.log"

    done = _daggyr(
        "-d", "--config", str(config), "--pidfile", str(pidfile), "--log-file", str(log)
    )
    if pidfile.exists():
        daemons.append(_pid_in(pidfile))

    assert done.returncode == 0, done.stderr
    rest_port, grpc_port = ports_in(done.stdout)
    assert http(rest_port, "GET", "/ready") == (200, {"status": "SERVING"})
    assert grpc_health(grpc_port) == "SERVING"
    pid = _pid_in(pidfile)
    assert alive(pid) and pid != os.getpid()
    assert f"running as pid {pid}" in done.stdout
    assert ports_in(log.read_text()) == (rest_port, grpc_port)

    again = _daggyr("-d", "--config", str(config), "--pidfile", str(pidfile))
    assert again.returncode == 1
    assert f"already running as pid {pid}" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert alive(pid)

    _stop(pid)
    assert not pidfile.exists()
    assert "shut down in" in log.read_text()
    assert cgroup_dirs(data["cgroup_root"]) == []


def test_stale_pidfile_is_replaced(tmp_path: Path, daemons: list[int]) -> None:
    config, _ = write_config(tmp_path)
    pidfile = tmp_path / "daggyr.pid"
    # A live pid that no daggyr holds the pidfile's lock for: stale, since
    # the pid of a runner killed outright may have been reused.
    pidfile.write_text(f"{os.getpid()}\n")

    done = _daggyr("-d", "--config", str(config), "--pidfile", str(pidfile))
    pid = _pid_in(pidfile)
    if pid != os.getpid():
        daemons.append(pid)

    assert done.returncode == 0, done.stderr
    assert pid != os.getpid() and alive(pid)
    _stop(pid)
    assert not pidfile.exists()


@pytest.mark.parametrize("which", ["port", "grpc-port"])
def test_daemon_on_a_taken_port_fails_naming_it(
    tmp_path: Path, daemons: list[int], which: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, data = write_config(tmp_path, **{which: port})  # the other: 0
        pidfile = tmp_path / "daggyr.pid"

        done = _daggyr("-d", "--config", str(config), "--pidfile", str(pidfile))
        if pidfile.exists() and pidfile.read_text().strip():
            daemons.append(_pid_in(pidfile))

    assert done.returncode == 1
    assert done.stdout == ""
    assert f"127.0.0.1:{port}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not pidfile.exists()
    assert processes_with_argument(str(config)) == []
    assert cgroup_dirs(data["cgroup_root"]) == []


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run daggyr as an unprivileged user",
)
def test_daemon_requiring_cgroups_it_cannot_have_fails(daemons: list[int]) -> None:
    # An unprivileged user cannot create cgroups on this host's hierarchies.
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o777)
        directory = Path(scratch)
        config, data = write_config(directory, require_cgroups=True)
        config.chmod(0o644)
        pidfile = directory / "daggyr.pid"

        done = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                DAGGYR,
                "-d",
                "--config",
                str(config),
                "--pidfile",
                str(pidfile),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=scratch,
        )
        if pidfile.exists() and pidfile.read_text().strip():
            daemons.append(_pid_in(pidfile))

        assert done.returncode == 2
        assert "config error: cgroups are required" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert processes_with_argument(str(config)) == []
        assert not pidfile.exists()
        assert cgroup_dirs(data["cgroup_root"]) == []


def test_pidfile_without_daemon_is_refused(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    done = _daggyr("--config", str(config), "--pidfile", str(tmp_path / "p"))
    assert done.returncode == 2
    assert "--pidfile and --log-file go with -d" in done.stderr


def test_daemon_keeps_the_working_directory(tmp_path: Path, daemons: list[int]) -> None:
    # A relative temp_root means the same with -d as without it.
    write_config(tmp_path, temp_root="relative-tasks")
    pidfile = tmp_path / "daggyr.pid"
    done = _daggyr(
        "-d", "--config", "config.json", "--pidfile", "daggyr.pid", cwd=tmp_path
    )
    if pidfile.exists():
        daemons.append(_pid_in(pidfile))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "relative-tasks").is_dir()
    port = ports_in(done.stdout)[0]
    task = {"command": ["pwd"], "memory_mb": 64}
    status, body = http(port, "POST", "/api/v1/task/pwd", task)
    assert status == 200, body
    status, body = http(port, "GET", "/api/v1/task/pwd?wait_seconds=30")
    assert isinstance(body, dict), body
    assert body["output_log"].startswith(str(tmp_path / "relative-tasks") + "/")
    _stop(_pid_in(pidfile))
    assert not pidfile.exists()


def test_unusable_pidfile_or_log_file_is_a_config_error(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    missing = tmp_path / "no-such-dir"
    for flag, says in (
        ("--pidfile", f"cannot open pidfile {missing}/p"),
        ("--log-file", f"cannot open log file {missing}/p"),
    ):
        done = _daggyr("-d", "--config", str(config), flag, str(missing / "p"))
        assert done.returncode == 2, done
        assert done.stderr.splitlines() == [
            f"daggyr: {says}: No such file or directory"
        ]
        assert processes_with_argument(str(config)) == []
