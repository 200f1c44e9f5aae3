"""Both ways into a cgroup, the C one-step spawn and the /bin/sh trampoline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import daggyr.spawn as spawn_module
from daggyr.cgroups import detect
from daggyr.spawn import Child, SpawnError, spawn

from .conftest import require_cgroups
from .process_helpers import alive


@pytest.fixture(params=["one-step", "trampoline"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "one-step":
        if spawn_module._spawn is None:
            if os.geteuid() == 0:
                pytest.fail("the daggyr._spawn extension was not built")
            pytest.skip("the daggyr._spawn extension was not built")
    else:
        monkeypatch.setattr(spawn_module, "_spawn", None)
    return str(request.param)


def _finish(child: Child) -> tuple[int, bytes, bytes]:
    code = child.wait()
    out = os.read(child.stdout, 1 << 16)
    err = os.read(child.stderr, 1 << 16)
    os.close(child.stdout)
    os.close(child.stderr)
    return code, out, err


def test_output_exit_code_and_process_group(way: str, tmp_path: Path) -> None:
    child = spawn(
        "/bin/sh",
        ["sh", "-c", "echo out; echo err >&2; ps -o pgid= -p $$; exit 3"],
        {"PATH": "/usr/bin:/bin"},
        str(tmp_path),
        (),
        None,
    )
    code, out, err = _finish(child)
    assert code == 3
    lines = out.decode().split()
    assert lines[0] == "out" and int(lines[1]) == child.pid  # its own group
    assert err == b"err\n"


def test_environment_is_exactly_what_is_given(way: str, tmp_path: Path) -> None:
    child = spawn("/usr/bin/env", ["env"], {"ONLY": "this"}, str(tmp_path), (), None)
    code, out, _ = _finish(child)
    assert code == 0
    assert out == b"ONLY=this\n"


@pytest.fixture
def cgroup() -> Iterator[object]:
    require_cgroups()
    manager = detect(f"daggyr-test-spawn-{uuid.uuid4().hex[:8]}")
    manager.setup()
    cg = manager.create("one", 1, 64, 64)
    assert cg is not None
    yield cg
    cg.remove_now()  # type: ignore[attr-defined]
    manager.teardown()


def test_child_is_in_its_cgroup_from_the_start(
    way: str, cgroup: object, tmp_path: Path
) -> None:
    procs = cgroup.procs_files  # type: ignore[attr-defined]
    child = spawn(
        "/bin/cat", ["cat", "/proc/self/cgroup"], {}, str(tmp_path), procs, None
    )
    code, out, _ = _finish(child)
    assert code == 0
    root = cgroup.path.split("/")[-2]  # type: ignore[attr-defined]
    memory = next(line for line in out.decode().splitlines() if ":memory:" in line)
    assert memory.endswith(f"/{root}/one")


def test_failures_name_the_step(tmp_path: Path) -> None:
    """Only the one-step spawn can tell: the trampoline fails after the start."""
    if spawn_module._spawn is None:
        pytest.fail("the daggyr._spawn extension was not built")
    with pytest.raises(SpawnError, match="command /no/such not found"):
        spawn("/no/such", ["/no/such"], {}, str(tmp_path), (), None)
    with pytest.raises(SpawnError, match="working directory /no/dir"):
        spawn("/bin/true", ["true"], {}, "/no/dir", (), None)
    with pytest.raises(SpawnError, match="could not join the task's cgroup via /no/"):
        spawn("/bin/true", ["true"], {}, str(tmp_path), ("/no/cgroup.procs",), None)


PARENT = """
import sys, time
import daggyr.spawn as s
if sys.argv[1] == "trampoline":
    s._spawn = None
child = s.spawn("/bin/sleep", ["sleep", "60"], {}, "/", (), None)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_the_task_dies_with_its_parent(way: str) -> None:
    if not spawn_module._SETPRIV and way == "trampoline":
        pytest.skip("setpriv is not installed")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, way], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        # The trampoline sets the parent-death signal only in setpriv, just
        # before the command's exec: wait for that exec.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if cmdline.read().startswith(b"sleep"):
                    break
            time.sleep(0.01)
        assert alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pid)


def test_stdin_is_dev_null_even_over_low_descriptors(tmp_path: Path) -> None:
    """A runner started with 0-2 closed must still give tasks /dev/null and pipes."""
    script = """
import os, sys
os.close(0)
import daggyr.spawn as s
if sys.argv[1] == "trampoline":
    s._spawn = None
child = s.spawn("/bin/sh", ["sh", "-c", "readlink /proc/self/fd/0; read x; echo rc=$?"],
                {}, "/", (), None)
print(child.wait(), os.read(child.stdout, 200).decode(), end="")
"""
    for way in ("one-step", "trampoline"):
        done = subprocess.run(
            [sys.executable, "-c", script, way], capture_output=True, text=True
        )
        assert done.stdout == "0 /dev/null\nrc=1\n", (way, done.stdout, done.stderr)


def test_signal_dispositions_are_defaults(tmp_path: Path) -> None:
    """One-step only: the trampoline cannot undo what the runner ignores."""
    if spawn_module._spawn is None:
        pytest.fail("the daggyr._spawn extension was not built")
    ignore_quit = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        child = spawn(
            "/bin/grep",
            ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"],
            {},
            str(tmp_path),
            (),
            None,
        )
    finally:
        signal.signal(signal.SIGQUIT, ignore_quit)
    code, out, _ = _finish(child)
    assert code == 0
    for line in out.decode().splitlines():
        assert line.split()[1] == "0" * 16, line


def test_a_missing_interpreter_is_named(tmp_path: Path) -> None:
    if spawn_module._spawn is None:
        pytest.fail("the daggyr._spawn extension was not built")
    script = tmp_path / "bad"
    script.write_text("#!/nonexistent/interp\n")
    script.chmod(0o755)
    with pytest.raises(SpawnError, match="interpreter /nonexistent/interp was not"):
        spawn(str(script), [str(script)], {}, str(tmp_path), (), None)
