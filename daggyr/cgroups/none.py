"""No enforcement: tasks run without cgroups, and every attempt says why."""

from __future__ import annotations

from collections.abc import Callable

from daggyr.cgroups.base import check_limits, check_name
from daggyr.cgroups.manager import CgroupManager
from daggyr.cgroups.task import TaskCgroup

__all__ = ["NoneCgroupManager", "OwnLimits"]

OwnLimits = Callable[[], tuple[float | None, int | None]]


class NoneCgroupManager(CgroupManager):
    """Stands in where no cgroup hierarchy is writable; ``reason`` says why.

    ``own_limits`` may still read the limits daggyr runs under, which needs
    only read access to the cgroup filesystem.
    """

    mode = "none"

    def __init__(self, reason: str, own_limits: OwnLimits | None = None) -> None:
        self.reason = reason
        self._own_limits = own_limits

    def setup(self) -> list[str]:
        return []

    def create(
        self, name: str, cores: float, memory_mb: int, pids_max: int
    ) -> TaskCgroup | None:
        # The same checks as the real back-ends, so a bad call fails alike.
        check_name(name)
        check_limits(cores, memory_mb, pids_max)
        return None

    def own_limits(self) -> tuple[float | None, int | None]:
        return self._own_limits() if self._own_limits else (None, None)

    def teardown(self) -> None:
        return None
