"""Tasks run as task_user: its uid, no supplementary groups, no root files."""

from __future__ import annotations

import logging
import pwd
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daggyr.config import Config
from daggyr.server import Server, StartupError

from .conftest import Runner, require_cgroups

MakeRunner = Callable[..., Awaitable[Runner]]
USER = "nobody"


@pytest.fixture
def base() -> Iterator[Path]:
    """A 0711 root-owned folder under /tmp (pytest's own tmp_path is 0700)."""
    require_cgroups()
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"this host has no {USER!r} user to run tasks as")
    folder = Path(tempfile.mkdtemp(prefix="daggyr-task-user-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def as_nobody(make_runner: MakeRunner, base: Path) -> Runner:
    return await make_runner(task_user=USER, temp_root=str(base / "tasks"))


async def _run(runner: Runner, task_id: str, command: list[str]) -> dict[str, Any]:
    status, body = await runner.rest(
        "POST", f"/api/v1/task/{task_id}", {"command": command, "memory_mb": 64}
    )
    assert status == 200, body
    return await runner.wait_rest(task_id)


async def test_task_runs_as_the_user_with_its_own_home(as_nobody: Runner) -> None:
    entry = pwd.getpwnam(USER)
    script = (
        'id -u; id -G; echo "$HOME"; echo "$TMPDIR"; stat -c "%u %a" "$HOME"; '
        'touch "$TMPDIR/scratch" && echo wrote; cat /proc/self/cgroup'
    )
    final = await _run(as_nobody, "who", ["sh", "-c", script])
    assert final["state"] == "SUCCEEDED", final
    lines = final["output_log"].splitlines()
    assert lines[0] == str(entry.pw_uid)
    assert lines[1] == str(entry.pw_gid)  # supplementary groups cleared
    assert lines[2] == lines[3]  # HOME is TMPDIR, the task's own directory
    assert lines[4] == f"{entry.pw_uid} 700"
    assert lines[5] == "wrote"

    # The trampoline joined the cgroup as root before setpriv dropped to the user.
    log = final["executor_log"].splitlines()
    cgroup_line = next(line for line in log if line.startswith("cgroup "))
    task_cgroup = Path(cgroup_line.split(" ", 1)[1]).name
    memberships = lines[6:]
    assert any(line.endswith("/" + task_cgroup) for line in memberships), (
        memberships,
        cgroup_line,
    )
    assert final["peak_memory_mb"] > 0


async def test_task_cannot_touch_root_files(as_nobody: Runner, base: Path) -> None:
    config_dir = base / "config"
    config_dir.mkdir(mode=0o755)
    secret = base / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)

    final = await _run(as_nobody, "write", ["touch", str(config_dir / "planted")])
    assert final["state"] == "FAILED"
    assert "Permission denied" in final["error_log"]
    assert not (config_dir / "planted").exists()

    final = await _run(as_nobody, "read", ["cat", str(secret)])
    assert final["state"] == "FAILED"
    assert "Permission denied" in final["error_log"]
    assert "root only" not in final["output_log"]


async def test_command_not_executable_by_the_user(
    as_nobody: Runner, base: Path, tmp_path: Path
) -> None:
    root_only = base / "root-only.sh"
    root_only.write_text("#!/bin/sh\necho ran\n")
    root_only.chmod(0o700)
    final = await _run(as_nobody, "mode", [str(root_only)])
    assert final["state"] == "SYSTEM_ERROR", final
    assert final["output_log"] == ""
    log = final["executor_log"]
    assert f"command {root_only} is not executable (permission denied)" in log

    # Executable by mode, but inside a folder the user cannot search.
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    program = hidden / "id"
    shutil.copy("/usr/bin/id", program)
    program.chmod(0o755)
    final = await _run(as_nobody, "hidden", [str(program), "-u"])
    assert final["state"] == "SYSTEM_ERROR", final
    assert final["output_log"] == ""
    log = final["executor_log"]
    assert f"{program}" in log
    assert "permission denied" in log.lower()


async def test_running_tasks_as_root_is_warned_about(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    require_cgroups()
    with caplog.at_level(logging.WARNING, logger="daggyr"):
        await make_runner()
    assert "tasks run as root: set task_user" in caplog.text


async def _start_error(settings: dict[str, Any]) -> str:
    server = Server(Config.model_validate({**settings, "port": 0, "grpc-port": 0}))
    try:
        with pytest.raises(StartupError) as caught:
            await server.start()
    finally:
        await server.stop()
    return str(caught.value)


async def test_unusable_task_user_is_a_startup_error(tmp_path: Path) -> None:
    require_cgroups()
    message = await _start_error(
        {"task_user": "no-such-user-here", "temp_root": str(tmp_path / "t")}
    )
    assert "task_user 'no-such-user-here' does not exist" in message

    # pytest's tmp_path sits under a 0700 folder: the user could not reach it.
    message = await _start_error({"task_user": USER, "temp_root": str(tmp_path / "t")})
    assert f"task_user {USER!r} cannot reach temp_root" in message
    assert "denies it search permission" in message
