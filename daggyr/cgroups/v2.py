"""cgroup v2: one directory per task under the runner's root, in the unified tree."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable

from daggyr.cgroups.base import (
    CPU_PERIOD_US,
    MIB,
    AppliedLimits,
    CgroupError,
    Usage,
    check_limits,
    check_name,
    cpu_quota,
)
from daggyr.cgroups.fs import CgroupFs, ancestors, inside, optional_words, parse_keyed
from daggyr.cgroups.manager import CgroupManager, make_dir, remove_roots, undo_mkdirs
from daggyr.cgroups.task import TaskCgroup, kill_each

__all__ = ["V2_CONTROLLERS", "V2CgroupManager", "V2TaskCgroup", "read_own_limits"]

logger = logging.getLogger(__name__)

# The controllers daggyr enables, in the order it writes them.
V2_CONTROLLERS = ("cpu", "memory", "pids")
# Freezing waits for every task to reach the freezer; a task stuck in
# uninterruptible sleep must not hold a kill up for long.
_FREEZE_SECONDS = 1.0


class V2TaskCgroup(TaskCgroup):
    """A task's cgroup v2 directory."""

    def __init__(
        self, fs: CgroupFs, path: str, root: str, notes: Iterable[str] = ()
    ) -> None:
        super().__init__(fs, path, (path,), (root,), notes)
        self._has_peak = fs.exists(self._file("memory.peak"))
        # Kernels before 5.19 keep no high-water mark: the executor samples.
        self.needs_sampling = not self._has_peak and fs.exists(
            self._file("memory.current")
        )
        self._sampled_bytes = 0

    def limits(self) -> AppliedLimits:
        quota, period = self._limit("cpu.max", 2)
        (memory,) = self._limit("memory.max", 1)
        (pids,) = self._limit("pids.max", 1)
        return AppliedLimits(quota / period, memory // MIB, pids)

    def signal_all(self, sig: int) -> int:
        kill = self._file("cgroup.kill")
        if sig == signal.SIGKILL and self._fs.exists(kill):
            # cgroup.kill reaches every process, forks in flight included.
            victims = self.pids()
            self._fs.write(kill, "1")
            return len(victims)
        freeze = self._file("cgroup.freeze")
        if not self._fs.exists(freeze):  # kernels before 5.2
            return kill_each(self.pids(), sig)
        # Frozen, nothing can fork between listing the pids and signalling them.
        self._fs.write(freeze, "1")
        try:
            self._wait_frozen()
            return kill_each(self.pids(), sig)
        finally:
            self._fs.write(freeze, "0")

    def sample(self) -> None:
        if self.needs_sampling:
            current = self._fs.read_int(self._file("memory.current"))
            self._sampled_bytes = max(self._sampled_bytes, current)

    def usage(self) -> Usage:
        notes: list[str] = []
        stat = parse_keyed(self._read("cpu.stat"))
        cpu_seconds = stat.get("usage_usec", 0) / 1e6
        throttled = stat.get("throttled_usec", 0) / 1e6
        if "throttled_usec" not in stat:
            notes.append("no cpu controller: throttled time not measured")
        return Usage(
            peak_memory_mb=self._peak_bytes(notes) / MIB,
            cpu_seconds=cpu_seconds,
            throttled_seconds=throttled,
            oom_kills=self._oom_kills(notes),
            notes=tuple(notes),
        )

    def _peak_bytes(self, notes: list[str]) -> int:
        if self._has_peak:
            return self._fs.read_int(self._file("memory.peak"))
        if self.needs_sampling:
            self.sample()
            notes.append(
                "peak memory sampled from memory.current (kernel has no memory.peak)"
            )
            return self._sampled_bytes
        notes.append("no memory controller: peak memory not measured")
        return 0

    def _oom_kills(self, notes: list[str]) -> int:
        # Only oom_kill counts: "max" and "high" rise whenever reclaim runs at
        # the limit, which page cache does all the time without any OOM.
        if not self._fs.exists(self._file("memory.events")):
            notes.append("no memory controller: OOM kills not counted")
            return 0
        return parse_keyed(self._read("memory.events")).get("oom_kill", 0)

    def _wait_frozen(self) -> None:
        deadline = time.monotonic() + _FREEZE_SECONDS
        while parse_keyed(self._read("cgroup.events")).get("frozen") != 1:
            if time.monotonic() >= deadline:
                logger.debug("%s not frozen after %ss", self.path, _FREEZE_SECONDS)
                return
            time.sleep(0.002)

    def _limit(self, name: str, count: int) -> list[int]:
        path = self._file(name)
        words = self._read(name).split()
        if words[:1] == ["max"]:
            raise CgroupError(f"{path} reads 'max': no limit in force")
        if len(words) != count:
            raise CgroupError(f"{path}: unexpected content {' '.join(words)!r}")
        try:
            return [int(w) for w in words]
        except ValueError:
            raise CgroupError(f"{path}: expected integers, got {words!r}") from None

    def _read(self, name: str) -> str:
        return self._fs.read(self._file(name))

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)


class V2CgroupManager(CgroupManager):
    """Task cgroups under ``<mount>/<root_name>`` (or an absolute root below it).

    ``controllers`` says which of cpu, memory and pids to enable and limit;
    by default those the mount's ``cgroup.controllers`` lists.
    """

    mode = "cgroup-v2"

    def __init__(
        self,
        mount: str = "/sys/fs/cgroup",
        root_name: str = "daggyr",
        *,
        controllers: Iterable[str] | None = None,
        fs: CgroupFs | None = None,
        proc_self_cgroup: str = "/proc/self/cgroup",
    ) -> None:
        self._fs = fs or CgroupFs()
        self._mount = os.path.normpath(mount)
        self._root = _root_path(self._mount, root_name)
        self.root_paths = (self._root,)
        if controllers is None:
            available = self._fs.read(os.path.join(mount, "cgroup.controllers"))
            controllers = available.split()
        self._controllers = [c for c in V2_CONTROLLERS if c in set(controllers)]
        self._proc_self_cgroup = proc_self_cgroup

    def setup(self) -> list[str]:
        # Each level can only hand its children controllers it was handed.
        parent = os.path.relpath(os.path.dirname(self._root), self._mount)
        for directory in reversed(ancestors(self._mount, parent)):
            self._enable_controllers(directory)
        make_dir(self._fs, self._root, exist_ok=True)
        self._enable_controllers(self._root)
        leftovers: list[TaskCgroup] = [
            V2TaskCgroup(self._fs, os.path.join(self._root, name), self._root)
            for name in self._fs.subdirs(self._root)
        ]
        return self._clean_leftovers(leftovers)

    def create(
        self, name: str, cores: float, memory_mb: int, pids_max: int
    ) -> V2TaskCgroup:
        check_name(name)
        check_limits(cores, memory_mb, pids_max)
        path = os.path.join(self._root, name)
        make_dir(self._fs, path)
        try:
            notes = self._write_limits(path, cores, memory_mb, pids_max)
            cgroup = V2TaskCgroup(self._fs, path, self._root, notes)
        except Exception as exc:
            if left := undo_mkdirs(self._fs, [path]):
                raise CgroupError(f"{exc}; and could not remove {left}") from exc
            raise
        logger.debug("created cgroup %s: %s", path, "; ".join(notes))
        return cgroup

    def own_limits(self) -> tuple[float | None, int | None]:
        return read_own_limits(self._fs, self._mount, self._proc_self_cgroup)

    def teardown(self) -> None:
        remove_roots(self._fs, self.root_paths)

    def _write_limits(
        self, path: str, cores: float, memory_mb: int, pids_max: int
    ) -> list[str]:
        notes = []
        write = self._fs.write
        if "cpu" in self._controllers:
            quota, note = cpu_quota(cores)
            write(os.path.join(path, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
            notes.append(note)
        else:
            notes.append("no cpu controller: cpu not limited")
        if "memory" in self._controllers:
            write(os.path.join(path, "memory.max"), str(memory_mb * MIB))
            swap = os.path.join(path, "memory.swap.max")
            if self._fs.exists(swap):
                write(swap, "0")
                notes.append(f"memory limit {memory_mb} MiB, swap 0")
            else:
                notes.append(
                    f"memory limit {memory_mb} MiB; memory.swap.max not available "
                    "on this kernel: swap not limited"
                )
        else:
            notes.append("no memory controller: memory not limited")
        if "pids" in self._controllers:
            write(os.path.join(path, "pids.max"), str(pids_max))
            notes.append(f"pids limit {pids_max}")
        else:
            notes.append("no pids controller: number of processes not limited")
        return notes

    def _enable_controllers(self, directory: str) -> None:
        control = os.path.join(directory, "cgroup.subtree_control")
        enabled = set(self._fs.read(control).split())
        missing = [c for c in self._controllers if c not in enabled]
        if missing:
            self._fs.write(control, " ".join(f"+{c}" for c in missing))
            logger.debug("enabled %s in %s", ", ".join(missing), control)


def read_own_limits(
    fs: CgroupFs, mount: str, proc_self_cgroup: str = "/proc/self/cgroup"
) -> tuple[float | None, int | None]:
    """The lowest cpu.max and memory.max from this process's cgroup up to the mount."""
    try:
        lines = fs.read(proc_self_cgroup).splitlines()
    except CgroupError as exc:
        logger.debug("own cgroup unknown: %s", exc)
        return None, None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        return None, None
    cores: float | None = None
    memory: int | None = None
    for directory in ancestors(mount, own):
        cpu = optional_words(fs, os.path.join(directory, "cpu.max"))
        if len(cpu) == 2 and cpu[0] != "max":
            ratio = int(cpu[0]) / int(cpu[1])
            cores = ratio if cores is None else min(cores, ratio)
        mem = optional_words(fs, os.path.join(directory, "memory.max"))
        if len(mem) == 1 and mem[0] != "max":
            mb = int(mem[0]) // MIB
            memory = mb if memory is None else min(memory, mb)
    return cores, memory


def _root_path(mount: str, root_name: str) -> str:
    if not os.path.isabs(root_name):
        check_name(root_name, "cgroup root name")
        return os.path.join(mount, root_name)
    root = os.path.normpath(root_name)
    if not inside(root, mount):
        raise CgroupError(f"cgroup root {root_name} is not below the mount {mount}")
    return root
