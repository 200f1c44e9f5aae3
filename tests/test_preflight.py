"""Start-up failures: a config mistake is exit 2, a run-time failure exit 1.

Either way the process prints one line saying why, binds nothing it keeps,
leaves no cgroup behind and logs no shutdown (nothing had started).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daggyr.config import Config, ConfigError
from daggyr.server import Server, StartupConfigError, StartupError

from .process_helpers import (
    DAGGYR,
    cgroup_dirs,
    free_port,
    port_is_free,
    processes_with_argument,
    unique_root,
    write_config,
)

# (config settings or flags, what the one line says); {dir} is the test's folder.
MISTAKES: dict[str, tuple[dict[str, Any], list[str], str]] = {
    "task_user missing": (
        {"task_user": "no-such-user-here"},
        [],
        "config error: task_user 'no-such-user-here' does not exist",
    ),
    "cgroup_root a path": ({}, ["--cgroup-root", "../../x"], "cgroup_root '../../x'"),
    "token file unreadable": (
        {"auth_token_file": "{dir}/missing-tokens"},
        [],
        "cannot read auth_token_file {dir}/missing-tokens",
    ),
    "tls files unreadable": (
        {"tls_cert_file": "{dir}/missing.pem", "tls_key_file": "{dir}/missing.pem"},
        [],
        "cannot read tls_cert_file {dir}/missing.pem",
    ),
    "public bind without auth": (
        {},
        ["--ip", "0.0.0.0"],
        "refusing to listen on 0.0.0.0 without authentication",
    ),
    "temp_root a file": (
        {"temp_root": "{dir}/a-file"},
        [],
        "temp_root {dir}/a-file is not a directory",
    ),
    "temp_root under a file": (
        {"temp_root": "{dir}/a-file/tasks"},
        [],
        "temp_root {dir}/a-file/tasks cannot be made: Not a directory",
    ),
}


def _filled(value: Any, directory: Path) -> Any:
    return value.format(dir=directory) if isinstance(value, str) else value


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAGGYR, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
@pytest.mark.parametrize("case", MISTAKES)
def test_config_mistake_found_at_start_up_is_exit_2_and_one_line(
    tmp_path: Path, case: str, daemon: bool
) -> None:
    settings, flags, expected = MISTAKES[case]
    (tmp_path / "a-file").write_text("not a directory\n")
    rest_port, grpc_port = free_port(), free_port()
    config, data = write_config(
        tmp_path,
        port=rest_port,
        **{"grpc-port": grpc_port},
        **{k: _filled(v, tmp_path) for k, v in settings.items()},
    )
    pidfile = tmp_path / "daggyr.pid"
    args = ["--config", str(config), *flags]
    if daemon:
        args += ["-d", "--pidfile", str(pidfile)]

    done = _run(args)

    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("daggyr: config error")
    assert _filled(expected, tmp_path) in lines[0]
    assert port_is_free(rest_port) and port_is_free(grpc_port)
    assert cgroup_dirs(data["cgroup_root"]) == []
    assert not pidfile.exists()
    assert processes_with_argument(str(config)) == []


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder an unprivileged user can use (pytest's tmp_path is 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run daggyr as an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="daggyr-preflight-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"task_user": "nobody"}, "task_user 'nobody' needs the runner to run as root"),
        ({"require_cgroups": True}, "cgroups are required but unavailable"),
    ],
    ids=["task_user without root", "cgroups required"],
)
def test_mistakes_of_an_unprivileged_runner_are_exit_2(
    shared_dir: Path, settings: dict[str, Any], expected: str
) -> None:
    config, data = write_config(shared_dir, **settings)
    config.chmod(0o644)
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    done = subprocess.run(
        [*unprivileged, DAGGYR, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=shared_dir,
    )

    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"daggyr: config error: {expected}")
    assert cgroup_dirs(data["cgroup_root"]) == []


@pytest.mark.parametrize("which", ["port", "grpc-port"])
def test_a_taken_port_is_exit_1_and_one_line(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = free_port()
        ports = {"port": other, "grpc-port": other, which: port}
        config, data = write_config(tmp_path, **ports)

        done = _run(["--config", str(config)])

    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    # The root warning is not printed: a failed start says only why.
    assert len(lines) == 1, done.stderr
    assert f"cannot start: cannot listen on 127.0.0.1:{port}" in lines[0]
    assert port_is_free(other)
    assert cgroup_dirs(data["cgroup_root"]) == []


async def test_a_config_mistake_raises_before_anything_is_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rest_port, grpc_port = free_port(), free_port()
    config = Config(
        port=rest_port,
        grpc_port=grpc_port,
        cgroup_root=unique_root(),
        temp_root=str(tmp_path / "tasks"),
        task_user="no-such-user-here",
    )
    server = Server(config)
    with caplog.at_level(logging.DEBUG, logger="daggyr"):
        with pytest.raises(StartupConfigError) as caught:
            await server.start()
        await server.stop()

    # Callers catching either (the CLI, older code) see it.
    assert isinstance(caught.value, StartupError)
    assert isinstance(caught.value, ConfigError)
    assert port_is_free(rest_port) and port_is_free(grpc_port)
    assert cgroup_dirs(config.cgroup_root) == []
    assert not (tmp_path / "tasks").exists()
    assert "shut" not in caplog.text


async def test_a_failed_start_undoes_what_it_set_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rest_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = Config(
            port=rest_port,
            grpc_port=taken.getsockname()[1],
            cgroup_root=unique_root(),
            temp_root=str(tmp_path / "tasks"),
        )
        server = Server(config)
        with caplog.at_level(logging.INFO, logger="daggyr"):
            with pytest.raises(StartupError) as caught:
                await server.start()
            await server.stop()

    assert not isinstance(caught.value, StartupConfigError)
    assert "for gRPC: Address already in use" in str(caught.value)
    assert port_is_free(rest_port)
    assert cgroup_dirs(config.cgroup_root) == []
    assert server.runner is None and server.rest_port == 0
    assert "shut" not in caplog.text
