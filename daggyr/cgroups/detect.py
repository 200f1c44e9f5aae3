"""Which cgroup back-end this host offers, found from /proc/self/mountinfo."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from daggyr.cgroups.base import CgroupError, check_name
from daggyr.cgroups.fs import CgroupFs, inside
from daggyr.cgroups.manager import CgroupManager
from daggyr.cgroups.none import NoneCgroupManager, OwnLimits
from daggyr.cgroups.v1 import V1_CONTROLLERS, V1CgroupManager
from daggyr.cgroups.v1 import read_own_limits as v1_own_limits
from daggyr.cgroups.v2 import V2_CONTROLLERS, V2CgroupManager
from daggyr.cgroups.v2 import read_own_limits as v2_own_limits

__all__ = ["Mount", "detect", "parse_mountinfo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: where, what filesystem, its super options."""

    point: str
    fstype: str
    options: frozenset[str]


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a /proc/<pid>/mountinfo text, in mount order."""
    mounts = []
    for line in text.splitlines():
        # Spaces inside fields are escaped (\040), so " - " only separates.
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if sep and len(fields) >= 5 and len(rest) >= 3:
            point = _unescape(fields[4])
            mounts.append(Mount(point, rest[0], frozenset(rest[2].split(","))))
    return mounts


def detect(
    root_name: str = "daggyr",
    *,
    require: bool = False,
    mountinfo: str = "/proc/self/mountinfo",
    fs: CgroupFs | None = None,
) -> CgroupManager:
    """The manager for the best writable back-end: cgroup v2, else v1, else none.

    v2 needs a cgroup2 mount offering cpu, memory and pids; v1 needs the cpu,
    cpuacct, memory, pids and freezer hierarchies mounted. Either must be
    writable where the runner's root goes. Otherwise the mode is "none" with
    the reason, or, with ``require``, CgroupError naming the reason. A
    ``root_name`` that is neither one path component nor absolute raises
    CgroupError either way: it is a configuration error.
    """
    fs = fs or CgroupFs()
    if not os.path.isabs(root_name):
        check_name(root_name, "cgroup root name")
    mounts = parse_mountinfo(fs.read(mountinfo))

    if not any(m.fstype in ("cgroup", "cgroup2") for m in mounts):
        return _none(f"no cgroup filesystem in {mountinfo}", require, fs, mounts)
    reasons: list[str] = []
    manager: CgroupManager | None = _v2(fs, mounts, root_name, reasons)
    if manager is None:
        manager = _v1(fs, mounts, root_name, reasons)
    if manager is not None:
        logger.debug("cgroups: %s, roots %s", manager.mode, manager.root_paths)
        return manager

    return _none("; ".join(reasons), require, fs, mounts)


def _none(
    reason: str, require: bool, fs: CgroupFs, mounts: list[Mount]
) -> NoneCgroupManager:
    if require:
        raise CgroupError(f"cgroups are required but unavailable: {reason}")
    logger.debug("cgroups: none (%s)", reason)
    return NoneCgroupManager(reason, _limits_reader(fs, mounts))


def _v2(
    fs: CgroupFs, mounts: list[Mount], root_name: str, reasons: list[str]
) -> V2CgroupManager | None:
    candidates = [m for m in mounts if m.fstype == "cgroup2"]
    if os.path.isabs(root_name):
        candidates = [m for m in candidates if inside(root_name, m.point)]
        if not candidates:
            reasons.append(f"cgroup root {root_name} is not below a cgroup2 mount")
    for mount in candidates:
        root = os.path.join(mount.point, root_name)
        parent = os.path.dirname(root)
        try:
            available = set(fs.read(os.path.join(parent, "cgroup.controllers")).split())
        except CgroupError as exc:
            reasons.append(str(exc))
            continue
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            names = _either(missing)
            reasons.append(f"no {names} controller in cgroup.controllers of {parent}")
            continue
        target = root if fs.is_dir(root) else parent
        if not fs.writable(target):
            reasons.append(_not_writable(target))
            continue
        return V2CgroupManager(mount.point, root_name, controllers=available, fs=fs)
    return None


def _v1(
    fs: CgroupFs, mounts: list[Mount], root_name: str, reasons: list[str]
) -> V1CgroupManager | None:
    hierarchies = _v1_hierarchies(mounts)
    missing = [c for c in V1_CONTROLLERS if c not in hierarchies]
    if missing:
        many = len(missing) > 1
        what = f"hierarch{'ies' if many else 'y'} {', '.join(missing)}"
        reasons.append(f"cgroup v1 {what} not mounted")
        return None
    if os.path.isabs(root_name):
        reasons.append(f"cgroup root {root_name} is a path, which needs cgroup v2")
        return None
    for point in dict.fromkeys(hierarchies.values()):
        root = os.path.join(point, root_name)
        target = root if fs.is_dir(root) else point
        if not fs.writable(target):
            reasons.append(_not_writable(target))
            return None
    return V1CgroupManager(hierarchies, root_name, fs=fs)


def _v1_hierarchies(mounts: list[Mount]) -> dict[str, str]:
    """Controller -> mount point of its v1 hierarchy (the first, if bound twice)."""
    found: dict[str, str] = {}
    for mount in (m for m in mounts if m.fstype == "cgroup"):
        for controller in sorted(mount.options):
            found.setdefault(controller, mount.point)
    return found


def _limits_reader(fs: CgroupFs, mounts: list[Mount]) -> OwnLimits | None:
    """Reads daggyr's own limits when it cannot create cgroups: needs read only."""
    hierarchies = _v1_hierarchies(mounts)
    if "cpu" in hierarchies or "memory" in hierarchies:
        return lambda: v1_own_limits(fs, hierarchies)
    v2 = next((m.point for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is not None:
        return lambda: v2_own_limits(fs, v2)
    return None


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _not_writable(path: str) -> str:
    if os.geteuid() != 0:
        return f"not root, and {path} is not writable"
    return f"{path} is not writable"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
