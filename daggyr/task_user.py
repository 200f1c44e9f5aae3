"""Checks that the account tasks run as can reach the directories given to it.

A task running as ``task_user`` gets HOME and TMPDIR in its own directory under
the temp root; if any directory above it denies that user search permission,
the task starts inside it (the runner changes into it as root) but cannot
reach it by path, and fails in ways far from the cause.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["unreachable_reason"]


def _can_search(info: os.stat_result, uid: int, gid: int) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def unreachable_reason(path: Path, uid: int, gid: int) -> str | None:
    """Why ``uid``:``gid`` (no supplementary groups) cannot reach ``path``, or None.

    Only mode bits are read: ACLs and security modules are not considered.
    """
    for folder in (path.resolve(), *path.resolve().parents):
        info = folder.stat()
        if not _can_search(info, uid, gid):
            return (
                f"{folder} (mode {stat.S_IMODE(info.st_mode):04o}, owner uid "
                f"{info.st_uid}) denies it search permission"
            )
    return None
