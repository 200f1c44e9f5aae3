"""Starting a task's process inside its cgroup, before its first instruction.

Two ways, one result. The C extension ``daggyr._spawn`` joins the cgroup,
drops to the task user, sets the parent-death signal, enters the directory
and execs, all between vfork and execve with raw system calls, which is safe
in a multi-threaded process (grpc runs threads; Python documents
``preexec_fn`` as unsafe there). Where the extension could not be built, a
/bin/sh trampoline does the same after exec, in a fresh single-threaded
process: it writes its own pid into each cgroup.procs file and execs
``setpriv``, which sets the parent-death signal and the user, then execs the
command. The trampoline costs two more execs per task, and signals the
runner ignores stay ignored in the task (a shell cannot undo that).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Child", "SpawnError", "TaskUser", "launch_error", "one_step", "spawn"]

_spawn: types.ModuleType | None
try:
    from daggyr import _spawn
except ImportError:  # not built: the trampoline serves
    _spawn = None

# Joins every cgroup named before "--", then execs the rest of argv.
_JOIN = (
    'unset PWD; while [ "$1" != -- ]; do echo 0 > "$1" || '
    '{ echo "daggyr-join-failed: $1" >&2; exit 125; }; shift; done; shift; exec "$@"'
)
# $0 of the shell that execs a task_user's command: prefixes its exec errors.
_EXEC_NAME = "daggyr-exec"
_SETPRIV = shutil.which("setpriv")


@dataclass(frozen=True)
class TaskUser:
    """The unprivileged account tasks run as."""

    name: str
    uid: int
    gid: int


class SpawnError(Exception):
    """The process could not be started; the message is for executor_log."""


class Child:
    """A started task process: its pid and the read ends of its output pipes."""

    def __init__(
        self, pid: int, stdout: int, stderr: int, popen: subprocess.Popen[bytes] | None
    ) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self._popen = popen

    def wait(self) -> int:
        """Reap the exited process: its exit code, or -signal."""
        if self._popen is not None:
            return self._popen.wait()
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def one_step() -> bool:
    """True when the C extension starts tasks (no trampoline)."""
    return _spawn is not None


def spawn(
    program: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    procs_files: Sequence[str],
    user: TaskUser | None,
) -> Child:
    """Start ``program`` with ``argv`` in a new process group, in its cgroup.

    Raises SpawnError saying which step failed.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    # Opened per task: an fd kept from import time would be another file
    # once the runner daemonizes and its descriptors are closed and reused.
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _spawn is not None:
            pid = _spawn_one_step(
                program, argv, env, cwd, procs_files, user, (devnull, out_w, err_w)
            )
            return Child(pid, out_r, err_r, None)
        popen = _spawn_trampoline(argv, env, cwd, procs_files, user, out_w, err_w)
        return Child(popen.pid, out_r, err_r, popen)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
        os.close(devnull)


def _spawn_one_step(
    program: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    procs_files: Sequence[str],
    user: TaskUser | None,
    stdio: tuple[int, int, int],
) -> int:
    assert _spawn is not None
    try:
        result = _spawn.spawn(
            os.fsencode(program),
            [os.fsencode(a) for a in argv],
            [os.fsencode(f"{k}={v}") for k, v in env.items()],
            os.fsencode(cwd),
            [os.fsencode(p) for p in procs_files],
            *stdio,
            user.uid if user else -1,
            user.gid if user else -1,
        )
    except OSError as exc:  # vfork or the status pipe itself
        raise SpawnError(f"could not start {argv[0]}: {exc.strerror}") from None
    if isinstance(result, int):
        return result
    stage, code, index = result
    raise SpawnError(_describe(stage, code, program, argv[0], cwd, procs_files, index))


def _describe(
    stage: str,
    code: int,
    program: str,
    argv0: str,
    cwd: str,
    procs: Sequence[str],
    index: int,
) -> str:
    why = os.strerror(code) if code else "unknown error"
    if stage == "exec":
        return _exec_failure(code, why, program, argv0)
    if stage == "chdir":
        return f"working directory {cwd}: {why}"
    if stage == "cgroup":
        where = procs[index] if 0 <= index < len(procs) else "cgroup.procs"
        return f"could not join the task's cgroup via {where}: {why}"
    if stage == "user":
        return f"could not switch to task_user: {why}"
    return f"could not start {argv0} ({stage}): {why}"


def _exec_failure(code: int, why: str, program: str, argv0: str) -> str:
    # The program was checked just before: when execve still fails, the cause
    # is often its #! interpreter, which the kernel reports as the program.
    interpreter = _interpreter(program)
    via = f" (its #! interpreter {interpreter})" if interpreter else ""
    if code == errno.ENOENT:
        if interpreter:
            return f"command {argv0}: its #! interpreter {interpreter} was not found"
        if os.path.exists(program):
            return f"command {argv0}: its program loader was not found"
        return f"command {argv0} not found"
    if code == errno.EACCES:
        return f"command {argv0}{via} is not executable (permission denied)"
    if code == errno.ENOEXEC:
        return f"command {argv0}{via}: the kernel cannot execute it (exec format error)"
    return f"could not execute the command {argv0}{via}: {why}"


def _interpreter(program: str) -> str:
    """The path on the program's #! line, or ""."""
    try:
        with open(program, "rb") as file:
            first = file.readline(256)
    except OSError:
        return ""
    if not first.startswith(b"#!"):
        return ""
    words = first[2:].split()
    return os.fsdecode(words[0]) if words else ""


def _spawn_trampoline(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    procs_files: Sequence[str],
    user: TaskUser | None,
    out_w: int,
    err_w: int,
) -> subprocess.Popen[bytes]:
    command = _behind_setpriv(argv, user)
    if procs_files:
        command = ["/bin/sh", "-c", _JOIN, "daggyr-join", *procs_files, "--", *command]
    try:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            cwd=cwd,
            env=dict(env),
            close_fds=True,
            process_group=0,
        )
    except OSError as exc:
        raise SpawnError(f"could not start {argv[0]}: {exc}") from None


def _behind_setpriv(argv: Sequence[str], user: TaskUser | None) -> list[str]:
    """The command behind setpriv, which sets the parent-death signal and user."""
    if not _SETPRIV:
        return list(argv)
    prefix = [_SETPRIV, "--pdeathsig", "KILL"]
    if user:
        prefix += ["--reuid", str(user.uid), "--regid", str(user.gid), "--clear-groups"]
        # setpriv keeps root's capabilities until its own execve, so the kernel
        # would let it execute a program the user cannot reach or execute. A
        # shell, started that way, execs the command with the user's rights.
        prefix += ["--", "/bin/sh", "-c", 'exec "$@"', _EXEC_NAME]
        return [*prefix, *argv]
    return [*prefix, "--", *argv]


def launch_error(returncode: int, stderr: str) -> str | None:
    """Why the trampoline or setpriv failed before the command ran, if they did."""
    if returncode == 125 and stderr.startswith("daggyr-join-failed: "):
        return "could not join the task's cgroup: " + stderr.splitlines()[-1]
    if returncode in (126, 127) and stderr.startswith(("setpriv: ", _EXEC_NAME + ":")):
        return "could not execute the command: " + stderr.splitlines()[0]
    return None
