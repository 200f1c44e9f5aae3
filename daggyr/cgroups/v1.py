"""cgroup v1: a task directory in each of the cpu, cpuacct, memory, pids, freezer trees.

Hierarchies may be mounted separately or together (``cpu,cpuacct``); a
directory shared by co-mounted controllers is created, joined and removed once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping

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
from daggyr.cgroups.fs import CgroupFs, ancestors, optional_words, parse_keyed
from daggyr.cgroups.manager import CgroupManager, make_dir, remove_roots, undo_mkdirs
from daggyr.cgroups.task import TaskCgroup, kill_each

__all__ = ["V1_CONTROLLERS", "V1CgroupManager", "V1TaskCgroup", "read_own_limits"]

logger = logging.getLogger(__name__)

# Memory first: its directory is the one executor_log shows.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
# memory.limit_in_bytes reads about 2**63 (rounded down to a page) when unset.
_UNLIMITED = 1 << 62
# A task stuck in uninterruptible sleep must not hold a kill up for long.
_FREEZE_SECONDS = 1.0


class V1TaskCgroup(TaskCgroup):
    """A task's directories, one per cgroup v1 hierarchy."""

    def __init__(
        self,
        fs: CgroupFs,
        dirs: Mapping[str, str],
        roots: tuple[str, ...],
        notes: Iterable[str] = (),
    ) -> None:
        paths = tuple(dict.fromkeys(dirs[c] for c in V1_CONTROLLERS if c in dirs))
        if not paths:
            raise CgroupError("a v1 task cgroup needs at least one hierarchy")
        super().__init__(fs, dirs.get("memory", paths[0]), paths, roots, notes)
        self._dirs = dict(dirs)
        if "freezer" in dirs:
            # Few files to list there, and it is the hierarchy kills go through.
            self.process_paths = (dirs["freezer"],)

    def limits(self) -> AppliedLimits:
        quota = self._int("cpu", "cpu.cfs_quota_us")
        period = self._int("cpu", "cpu.cfs_period_us")
        memory = self._int("memory", "memory.limit_in_bytes")
        pids = self._read("pids", "pids.max").strip()
        if quota < 0:
            path = self._file("cpu", "cpu.cfs_quota_us")
            raise CgroupError(f"{path} reads {quota}: no limit in force")
        if memory >= _UNLIMITED:
            path = self._file("memory", "memory.limit_in_bytes")
            raise CgroupError(f"{path} reads {memory}: no limit in force")
        if not pids.isdigit():
            raise CgroupError(f"{self._file('pids', 'pids.max')} reads {pids!r}")
        return AppliedLimits(quota / period, memory // MIB, int(pids))

    def signal_all(self, sig: int) -> int:
        if "freezer" not in self._dirs:
            return kill_each(self.pids(), sig)
        # Frozen, nothing can fork between listing the pids and signalling them.
        state = self._file("freezer", "freezer.state")
        self._fs.write(state, "FROZEN")
        try:
            self._wait_frozen(state)
            return kill_each(self.pids(), sig)
        finally:
            self._fs.write(state, "THAWED")

    def usage(self) -> Usage:
        notes: list[str] = []
        # oom_kill, not failcnt or under_oom: failcnt rises whenever reclaim
        # runs at the limit, which page cache does all the time without an OOM.
        oom = parse_keyed(self._read("memory", "memory.oom_control"))
        if "oom_kill" not in oom:
            notes.append("memory.oom_control has no oom_kill: OOM kills not counted")
        stat = parse_keyed(self._read("cpu", "cpu.stat"))
        return Usage(
            peak_memory_mb=self._int("memory", "memory.max_usage_in_bytes") / MIB,
            cpu_seconds=self._int("cpuacct", "cpuacct.usage") / 1e9,
            throttled_seconds=stat.get("throttled_time", 0) / 1e9,
            oom_kills=oom.get("oom_kill", 0),
            notes=tuple(notes),
        )

    def _wait_frozen(self, state: str) -> None:
        deadline = time.monotonic() + _FREEZE_SECONDS
        while self._fs.read(state).strip() != "FROZEN":
            if time.monotonic() >= deadline:
                logger.debug("%s not frozen after %ss", state, _FREEZE_SECONDS)
                return
            time.sleep(0.002)

    def _int(self, controller: str, name: str) -> int:
        return self._fs.read_int(self._file(controller, name))

    def _read(self, controller: str, name: str) -> str:
        return self._fs.read(self._file(controller, name))

    def _file(self, controller: str, name: str) -> str:
        directory = self._dirs.get(controller)
        if directory is None:
            raise CgroupError(f"cgroup {self.path} has no {controller} directory")
        return os.path.join(directory, name)


class V1CgroupManager(CgroupManager):
    """Task cgroups under ``<mount>/<root_name>`` in each v1 hierarchy.

    ``mounts`` maps each of cpu, cpuacct, memory, pids and freezer to the
    mount point of its hierarchy; co-mounted controllers share one.
    """

    mode = "cgroup-v1"

    def __init__(
        self,
        mounts: Mapping[str, str],
        root_name: str = "daggyr",
        *,
        fs: CgroupFs | None = None,
        proc_self_cgroup: str = "/proc/self/cgroup",
    ) -> None:
        missing = [c for c in V1_CONTROLLERS if c not in mounts]
        if missing:
            raise CgroupError(f"no mount given for v1 hierarchy {', '.join(missing)}")
        check_name(root_name, "cgroup root name")
        self._fs = fs or CgroupFs()
        self._mounts = {c: os.path.normpath(mounts[c]) for c in V1_CONTROLLERS}
        self._roots = {c: os.path.join(m, root_name) for c, m in self._mounts.items()}
        self.root_paths = tuple(dict.fromkeys(self._roots.values()))
        self._proc_self_cgroup = proc_self_cgroup

    def setup(self) -> list[str]:
        for root in self.root_paths:
            make_dir(self._fs, root, exist_ok=True)
        names = sorted({n for root in self.root_paths for n in self._fs.subdirs(root)})
        leftovers: list[TaskCgroup] = []
        for name in names:
            # A runner killed mid-create may have left some hierarchies only.
            dirs = {c: os.path.join(r, name) for c, r in self._roots.items()}
            present = {c: d for c, d in dirs.items() if self._fs.is_dir(d)}
            leftovers.append(V1TaskCgroup(self._fs, present, self.root_paths))
        return self._clean_leftovers(leftovers)

    def create(
        self, name: str, cores: float, memory_mb: int, pids_max: int
    ) -> V1TaskCgroup:
        check_name(name)
        check_limits(cores, memory_mb, pids_max)
        dirs = {c: os.path.join(r, name) for c, r in self._roots.items()}
        created: list[str] = []
        try:
            for path in dict.fromkeys(dirs.values()):
                make_dir(self._fs, path)
                created.append(path)
            notes = self._write_limits(dirs, cores, memory_mb, pids_max)
            cgroup = V1TaskCgroup(self._fs, dirs, self.root_paths, notes)
        except Exception as exc:
            if left := undo_mkdirs(self._fs, created):
                raise CgroupError(f"{exc}; and could not remove {left}") from exc
            raise
        logger.debug("created cgroup %s: %s", cgroup.path, "; ".join(notes))
        return cgroup

    def own_limits(self) -> tuple[float | None, int | None]:
        return read_own_limits(self._fs, self._mounts, self._proc_self_cgroup)

    def teardown(self) -> None:
        remove_roots(self._fs, self.root_paths)

    def _write_limits(
        self, dirs: Mapping[str, str], cores: float, memory_mb: int, pids_max: int
    ) -> list[str]:
        notes = []
        write = self._fs.write
        quota, note = cpu_quota(cores)
        # The period first: a quota is checked against the period in force.
        write(os.path.join(dirs["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        write(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), str(quota))
        notes.append(note)

        # memsw (memory + swap) may never be below the memory limit: set it after.
        limit = str(memory_mb * MIB)
        write(os.path.join(dirs["memory"], "memory.limit_in_bytes"), limit)
        memsw = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
        if self._fs.exists(memsw):
            write(memsw, limit)
            notes.append(f"memory limit {memory_mb} MiB, swap 0")
        else:
            notes.append(
                f"memory limit {memory_mb} MiB; memsw not available on this "
                "kernel: swap not limited"
            )

        write(os.path.join(dirs["pids"], "pids.max"), str(pids_max))
        notes.append(f"pids limit {pids_max}")
        return notes


def read_own_limits(
    fs: CgroupFs, mounts: Mapping[str, str], proc_self_cgroup: str = "/proc/self/cgroup"
) -> tuple[float | None, int | None]:
    """The lowest CFS quota and memory limit from this process's cgroups upwards."""
    try:
        lines = fs.read(proc_self_cgroup).splitlines()
    except CgroupError as exc:
        logger.debug("own cgroup unknown: %s", exc)
        return None, None
    own: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            own.update(dict.fromkeys(parts[1].split(","), parts[2]))

    cores: float | None = None
    if "cpu" in own and "cpu" in mounts:
        for directory in ancestors(mounts["cpu"], own["cpu"]):
            quota = _first_int(fs, os.path.join(directory, "cpu.cfs_quota_us"))
            period = _first_int(fs, os.path.join(directory, "cpu.cfs_period_us"))
            if quota and period and quota > 0 and period > 0:
                ratio = quota / period
                cores = ratio if cores is None else min(cores, ratio)

    memory: int | None = None
    if "memory" in own and "memory" in mounts:
        for directory in ancestors(mounts["memory"], own["memory"]):
            limit = _first_int(fs, os.path.join(directory, "memory.limit_in_bytes"))
            if limit and 0 < limit < _UNLIMITED:
                mb = limit // MIB
                memory = mb if memory is None else min(memory, mb)
    return cores, memory


def _first_int(fs: CgroupFs, path: str) -> int | None:
    words = optional_words(fs, path)
    return int(words[0]) if words and words[0] != "max" else None
