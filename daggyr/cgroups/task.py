"""One task's cgroup: the interface the executor uses, and what v1 and v2 share."""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import os
import time
from collections.abc import Iterable

from daggyr.cgroups.base import AppliedLimits, CgroupError, Usage
from daggyr.cgroups.fs import CgroupFs, inside

__all__ = ["TaskCgroup", "kill_each"]

logger = logging.getLogger(__name__)

# How often wait_empty looks at cgroup.procs.
_POLL_SECONDS = 0.02
# How long remove() keeps retrying an rmdir the kernel refuses with EBUSY
# (processes that were just killed take a moment to leave the cgroup).
_REMOVE_SECONDS = 2.0
_RETRYABLE = (errno.EBUSY, errno.ENOTEMPTY)


class TaskCgroup(abc.ABC):
    """The cgroup (one directory per hierarchy) a single task runs in."""

    path: str
    paths: tuple[str, ...]
    procs_files: tuple[str, ...]
    notes: list[str]
    needs_sampling: bool

    def __init__(
        self,
        fs: CgroupFs,
        path: str,
        paths: tuple[str, ...],
        roots: tuple[str, ...],
        notes: Iterable[str] = (),
    ) -> None:
        for p in paths:
            if not any(inside(p, root) for root in roots):
                raise CgroupError(f"cgroup {p} is not under the runner's root")
        self._fs = fs
        self._roots = roots
        self.path = path
        self.paths = paths
        self.procs_files = tuple(os.path.join(p, "cgroup.procs") for p in paths)
        # Where to look for the task's processes: every process joins every
        # path, so a back-end may name just one and save reads on the hot path.
        self.process_paths = paths
        self.notes = list(notes)
        self.needs_sampling = False

    @abc.abstractmethod
    def limits(self) -> AppliedLimits:
        """The cores, memory and pids limits as the kernel reports them now."""

    @abc.abstractmethod
    def signal_all(self, sig: int) -> int:
        """Send ``sig`` to every process of the cgroup, forks included.

        Returns how many processes were signalled. A process that exits
        meanwhile is skipped, never an error. Blocks while the cgroup freezes,
        usually a few milliseconds and never much more than a second.
        """

    @abc.abstractmethod
    def usage(self) -> Usage:
        """The task's peak memory, CPU time, throttling and OOM kills so far."""

    def sample(self) -> None:
        """Record memory use now, where the kernel keeps no high-water mark."""
        return None

    def pids(self) -> list[int]:
        """Every process in the cgroup and any cgroup below it, sorted."""
        found: set[int] = set()
        for directory in self._tree(self.process_paths):
            procs = os.path.join(directory, "cgroup.procs")
            try:
                text = self._fs.read(procs)
            except CgroupError:
                # A sub-cgroup removed between listing and reading has no pids.
                if self._fs.exists(procs):
                    raise
                continue
            found.update(int(word) for word in text.split())
        return sorted(found)

    def is_empty(self) -> bool:
        """Whether no process is left in the cgroup."""
        return not self.pids()

    async def wait_empty(self, timeout: float) -> bool:
        """Poll until no process is left; False if some still are after timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.is_empty():
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(_POLL_SECONDS, left))
        return True

    def wait_empty_now(self, timeout: float) -> bool:
        """wait_empty for callers outside an event loop (start-up clean-up)."""
        deadline = time.monotonic() + timeout
        while not self.is_empty():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_POLL_SECONDS, left))
        return True

    async def remove(self) -> None:
        """Remove every directory, children first, retrying while EBUSY.

        Idempotent: directories already gone are fine. Raises CgroupError
        naming what is left once the kernel has refused for about 2 s.
        """
        delay = 0.01
        deadline = time.monotonic() + _REMOVE_SECONDS
        while busy := self._rmdir_pass():
            if time.monotonic() >= deadline:
                raise _still_busy(busy)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def remove_now(self) -> None:
        """remove() for callers outside an event loop (start-up clean-up)."""
        delay = 0.01
        deadline = time.monotonic() + _REMOVE_SECONDS
        while busy := self._rmdir_pass():
            if time.monotonic() >= deadline:
                raise _still_busy(busy)
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _rmdir_pass(self) -> list[tuple[str, OSError]]:
        """Try each rmdir once, deepest first; return those the kernel refused."""
        busy: list[tuple[str, OSError]] = []
        for directory in reversed(self._tree()):
            try:
                self._fs.rmdir(directory)
                logger.debug("removed cgroup %s", directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in _RETRYABLE:
                    raise CgroupError(f"rmdir {directory}: {exc.strerror}") from exc
                busy.append((directory, exc))
        return busy

    def _tree(self, paths: tuple[str, ...] | None = None) -> list[str]:
        """Every directory of this cgroup (or of ``paths``), parents first.

        Only real directories under the runner's root are listed, so clean-up
        can never wander outside it, whatever a task created in its cgroup.
        """
        found: list[str] = []
        pending = [p for p in (paths or self.paths) if self._fs.is_dir(p)]
        while pending:
            directory = pending.pop(0)
            if not any(inside(directory, root) for root in self._roots):
                continue
            found.append(directory)
            children = self._fs.subdirs(directory)
            pending.extend(os.path.join(directory, name) for name in children)
        return found


def kill_each(pids: Iterable[int], sig: int) -> int:
    """Send ``sig`` to each pid; count those that still existed."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        except PermissionError as exc:
            raise CgroupError(f"kill({pid}, {sig}): {exc.strerror}") from exc
        sent += 1
    return sent


def _still_busy(busy: list[tuple[str, OSError]]) -> CgroupError:
    names = ", ".join(f"{d} ({exc.strerror})" for d, exc in busy)
    return CgroupError(f"rmdir refused for {_REMOVE_SECONDS:g} s: {names}")
