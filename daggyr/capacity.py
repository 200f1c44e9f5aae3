"""What a runner offers to tasks: detected at start-up, overridable by config.

Cores are kept in millionths internally so that sums and differences of many
fractional reservations stay exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import psutil

__all__ = ["MICRO", "Resources", "detect_capacity"]

MICRO = 1_000_000


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of cores (in millionths) and memory (MiB)."""

    micro_cores: int
    memory_mb: int

    @classmethod
    def of(cls, cores: float, memory_mb: int) -> Resources:
        """Resources for a request; fractional micro-cores round up."""
        return cls(math.ceil(cores * MICRO - 1e-6), memory_mb)

    @property
    def cores(self) -> float:
        return self.micro_cores / MICRO

    def fits_in(self, other: Resources) -> bool:
        return (
            self.micro_cores <= other.micro_cores and self.memory_mb <= other.memory_mb
        )

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.micro_cores + other.micro_cores, self.memory_mb + other.memory_mb
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.micro_cores - other.micro_cores, self.memory_mb - other.memory_mb
        )


def detect_capacity(
    cores_override: float | None,
    memory_override: int | None,
    own_limits: tuple[float | None, int | None] = (None, None),
) -> tuple[Resources, list[str]]:
    """Total capacity and one line per figure saying where it came from.

    cores = max(1, logical CPUs - 2) and memory = max(100, 75% of RAM), each
    lowered to the limit of the cgroup daggyr itself runs in. An override
    replaces the figure; ``cores`` 0 means every logical CPU.
    """
    logical = os.cpu_count() or 1
    notes = []
    own_cores, own_memory = own_limits

    if cores_override is not None:
        cores = float(logical) if cores_override == 0 else cores_override
        notes.append(f"cores {cores:g} from capacity_overrides")
    else:
        cores = float(max(1, logical - 2))
        notes.append(f"cores {cores:g} detected ({logical} logical CPUs)")
        if own_cores is not None and own_cores < cores:
            cores = own_cores
            notes.append(f"cores lowered to {cores:g} by daggyr's own cgroup quota")

    if memory_override is not None:
        memory = memory_override
        notes.append(f"memory_mb {memory} from capacity_overrides")
    else:
        total_mb = psutil.virtual_memory().total // (1 << 20)
        memory = max(100, int(total_mb * 0.75))
        notes.append(f"memory_mb {memory} detected ({total_mb} MiB RAM)")
        if own_memory is not None and own_memory < memory:
            memory = own_memory
            notes.append(f"memory_mb lowered to {memory} by daggyr's own cgroup limit")
    return Resources.of(cores, memory), notes
