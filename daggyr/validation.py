"""Checks on what clients send, done once for both protocols before anything is stored.

Everything execve cannot carry is refused here, naming the field, so that a
task that was accepted can always be started.
"""

from __future__ import annotations

import math
import os
import re

from daggyr.errors import InvalidArgument
from daggyr.v1 import task_pb2

__all__ = ["MAX_TASK_ID_LENGTH", "normalized_task", "validate_task_id"]

MAX_TASK_ID_LENGTH = 200
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._~:-]+")
_BAD_CHAR = re.compile(r"[^A-Za-z0-9._~:/-]")


def validate_task_id(task_id: str) -> str:
    """Return ``task_id`` if it follows the id rule, else raise InvalidArgument."""
    if not task_id:
        raise InvalidArgument("task_id is required: 1 to 200 characters")
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise InvalidArgument(
            f"task_id must be at most {MAX_TASK_ID_LENGTH} characters "
            f"(got {len(task_id)})"
        )
    bad = _BAD_CHAR.search(task_id)
    if bad:
        raise InvalidArgument(
            f"task_id {task_id!r} contains {bad.group()!r}: use A-Z a-z 0-9 . _ ~ : -"
            " and '/' between segments"
        )
    for number, segment in enumerate(task_id.split("/"), start=1):
        if not segment:
            raise InvalidArgument(
                f"task_id {task_id!r} has an empty segment (number {number}): "
                "'/' must separate non-empty segments"
            )
        if segment in (".", ".."):
            raise InvalidArgument(
                f"task_id {task_id!r} has the segment {segment!r} (number {number}), "
                "which is not allowed"
            )
        assert _SEGMENT_CHARS.fullmatch(segment)
    return task_id


def _check_no_nul(field: str, value: str) -> None:
    if "\0" in value:
        raise InvalidArgument(f"{field} contains a NUL byte")


# execve refuses one string longer than this (MAX_ARG_STRLEN) with E2BIG.
_MAX_STRING = 131072
# ... and argv plus environment past a quarter of the stack limit (ARG_MAX).
_MAX_TOTAL = os.sysconf("SC_ARG_MAX") if hasattr(os, "sysconf") else 2 << 20


def _check_exec_size(task: task_pb2.Task) -> None:
    """Refuse what execve would refuse with E2BIG, before anything is reserved."""
    total = 0
    for index, arg in enumerate(task.command):
        size = len(arg.encode()) + 1
        if size > _MAX_STRING:
            raise InvalidArgument(
                f"command[{index}] is {size - 1} bytes; the kernel takes at most "
                f"{_MAX_STRING - 1} per argument"
            )
        total += size + 8
    for name, value in task.environment.items():
        size = len(name.encode()) + len(value.encode()) + 2
        if size > _MAX_STRING:
            raise InvalidArgument(
                f"environment[{name!r}] is {size - 2} bytes; the kernel takes at "
                f"most {_MAX_STRING - 2} per variable"
            )
        total += size + 8
    # Leave room for the base environment and the runner's own wrapper.
    if total > _MAX_TOTAL - 16384:
        raise InvalidArgument(
            f"command and environment together are {total} bytes; the kernel "
            f"takes at most about {_MAX_TOTAL - 16384}"
        )


def normalized_task(task: task_pb2.Task, default_memory_mb: int) -> task_pb2.Task:
    """A copy of ``task`` with defaults filled in; InvalidArgument names the field."""
    if not task.command:
        raise InvalidArgument("command is required: the argv to run, e.g. ['true']")
    if not task.command[0]:
        raise InvalidArgument("command[0] is empty: it must name the program to run")
    for index, arg in enumerate(task.command):
        _check_no_nul(f"command[{index}]", arg)
    for name, value in task.environment.items():
        if not name:
            raise InvalidArgument("environment has an empty key")
        if "=" in name:
            raise InvalidArgument(f"environment key {name!r} contains '='")
        _check_no_nul(f"environment key {name!r}", name)
        _check_no_nul(f"environment[{name!r}]", value)
    _check_no_nul("working_directory", task.working_directory)
    if task.working_directory and not task.working_directory.startswith("/"):
        raise InvalidArgument(
            f"working_directory {task.working_directory!r} must be an absolute path"
        )
    _check_exec_size(task)

    out = task_pb2.Task()
    out.CopyFrom(task)
    if task.HasField("cores"):
        if not math.isfinite(task.cores) or task.cores <= 0:
            raise InvalidArgument(
                f"cores must be a finite number greater than 0 (got {task.cores})"
            )
    else:
        out.cores = 1.0
    if task.HasField("memory_mb"):
        if task.memory_mb == 0:
            raise InvalidArgument("memory_mb must be greater than 0 (got 0)")
    else:
        out.memory_mb = default_memory_mb
    return out
