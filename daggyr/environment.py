"""What a task's process starts with: its environment, directory and program.

The checks here run just before the spawn, so that a missing directory and a
missing command are told apart in executor_log instead of surfacing as one
OSError from the child.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = ["BASE_PATH", "StartError", "base_environment", "check_start"]

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StartError(Exception):
    """The task cannot start; the message is for executor_log."""


def base_environment(
    task_env: Mapping[str, str], temp_dir: str, home: str | None = None
) -> dict[str, str]:
    """The minimal base with the task's own variables over it.

    Nothing of the runner's own environment is passed on: its secrets stay
    with it.
    """
    env = {
        "PATH": BASE_PATH,
        "LANG": "C.UTF-8",
        "HOME": home or temp_dir,
        "TMPDIR": temp_dir,
    }
    env.update(task_env)
    return env


def _check_directory(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise StartError(f"working directory {path} does not exist") from None
    except NotADirectoryError:
        raise StartError(
            f"working directory {path} does not exist (a parent is not a directory)"
        ) from None
    except OSError as exc:
        raise StartError(f"working directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StartError(f"working directory {path} is not a directory")


def _can_execute(info: os.stat_result, uid: int, gids: set[int]) -> bool:
    if uid == 0:
        return bool(info.st_mode & 0o111)
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in gids:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _check_program(path: str, uid: int, gids: set[int]) -> str | None:
    """None when ``path`` can be executed, else why not."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not an executable"
    if not stat.S_ISREG(info.st_mode) or not _can_execute(info, uid, gids):
        return "is not executable (permission denied)"
    if not _has_exec_format(path):
        return "is not executable (exec format error: neither ELF nor a #! script)"
    return None


def _has_exec_format(path: str) -> bool:
    """False when the kernel would refuse the file with ENOEXEC.

    execvp would then run it through /bin/sh instead, which direct execution
    must not do. Formats registered through binfmt_misc other than ELF and #!
    are not recognised here.
    """
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError:
        return True  # unreadable but executable: let the kernel decide
    return magic.startswith(b"#!") or magic == b"\x7fELF"


def check_start(
    argv0: str, cwd: str, env: Mapping[str, str], uid: int, gids: set[int]
) -> str:
    """The program's path, after checking the directory and the program.

    Raises StartError naming the directory or the command, never both.
    """
    _check_directory(cwd)

    if "/" in argv0:
        path = argv0 if os.path.isabs(argv0) else str(Path(cwd, argv0))
        why = _check_program(path, uid, gids)
        if why == "not found":
            raise StartError(f"command {argv0} not found")
        if why:
            raise StartError(f"command {argv0} {why}")
        return path

    search = env.get("PATH", BASE_PATH)
    refused = None
    for folder in search.split(":"):
        candidate = str(Path(cwd, folder or ".", argv0))
        why = _check_program(candidate, uid, gids)
        if why is None:
            return candidate
        if why != "not found" and refused is None:
            refused = f"command {argv0} found as {candidate}, which {why}"
    if refused:
        raise StartError(refused)
    raise StartError(f"command {argv0} not found in PATH={search}")
