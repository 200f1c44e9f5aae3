"""What every back-end shares: the error, the figures it reports, the CPU rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "CPU_PERIOD_US",
    "MIB",
    "MIN_CPU_QUOTA_US",
    "AppliedLimits",
    "CgroupError",
    "Usage",
    "check_limits",
    "check_name",
    "cpu_quota",
]

CPU_PERIOD_US = 100_000
# The kernel refuses a CFS quota below 1 ms with EINVAL, on v1 and v2 alike.
MIN_CPU_QUOTA_US = 1_000
MIB = 1 << 20


class CgroupError(Exception):
    """A cgroup operation failed; the message names the file or directory and why."""


@dataclass(frozen=True)
class Usage:
    """What a task consumed, from the cgroup's own accounting."""

    peak_memory_mb: float
    cpu_seconds: float
    throttled_seconds: float
    oom_kills: int
    notes: tuple[str, ...]


@dataclass(frozen=True)
class AppliedLimits:
    """The limits in force, as read back from the cgroup after writing them."""

    cores: float
    memory_mb: int
    pids: int


def cpu_quota(cores: float) -> tuple[int, str]:
    """The CFS quota in µs for ``cores`` over CPU_PERIOD_US, and a note saying so.

    A quota below the kernel's minimum is raised to it rather than refused, so
    a tiny ``cores`` still runs (with slightly more CPU than asked for).
    """
    quota = round(cores * CPU_PERIOD_US)
    applied = f"{max(quota, MIN_CPU_QUOTA_US)}us/{CPU_PERIOD_US}us"
    if quota >= MIN_CPU_QUOTA_US:
        return quota, f"cpu quota {applied} ({quota / CPU_PERIOD_US:g} cores)"
    granted = MIN_CPU_QUOTA_US / CPU_PERIOD_US
    return MIN_CPU_QUOTA_US, (
        f"cpu quota {applied} ({granted:g} cores; {cores:g} requested, raised to "
        f"the kernel minimum of {MIN_CPU_QUOTA_US}us)"
    )


def check_limits(cores: float, memory_mb: int, pids_max: int) -> None:
    """Refuse limits no cgroup can express, before anything is created."""
    if not (math.isfinite(cores) and cores > 0):
        raise CgroupError(f"cores must be a positive finite number, got {cores!r}")
    if memory_mb <= 0:
        raise CgroupError(f"memory_mb must be positive, got {memory_mb!r}")
    if pids_max <= 0:
        raise CgroupError(f"pids_max must be positive, got {pids_max!r}")


def check_name(name: str, what: str = "cgroup name") -> None:
    """Refuse anything but a single, plain path component."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise CgroupError(f"{what} {name!r} is not a single path component")
