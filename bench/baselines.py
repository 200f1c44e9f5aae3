"""What the runner is measured against: bare spawns of /bin/true, and a bare pipe.

The spawns run in a separate, plain Python process (``python -m bench.baselines
KIND ...``, printing JSON), so the runner's load never slows them down and
nothing of daggyr is imported. The cgroup variant is written as plainly as it
can be: mkdir in each hierarchy, write the limits, join in ``preexec_fn``,
wait, rmdir; it shows what the cgroup itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PlainCgroups", "measure", "pipe_rate"]

CGROUP_MOUNT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
CPU_PERIOD_US = 100_000
MIB = 1 << 20


class PlainCgroups:
    """Task cgroups under ``root_name`` in every hierarchy (v1) or the v2 mount."""

    def __init__(self, root_name: str) -> None:
        self.v2 = (CGROUP_MOUNT / "cgroup.controllers").exists()
        if self.v2:
            mounts = [CGROUP_MOUNT]
        else:
            # cpu and cpuacct are often one hierarchy behind two symlinks.
            found = {(CGROUP_MOUNT / c).resolve() for c in V1_CONTROLLERS}
            mounts = sorted(found)
            missing = [c for c in V1_CONTROLLERS if not (CGROUP_MOUNT / c).is_dir()]
            if missing:
                raise OSError(f"no cgroup v1 hierarchy for {', '.join(missing)}")
        self.roots = [m / root_name for m in mounts]
        for root in self.roots:
            root.mkdir(exist_ok=True)
        if self.v2:
            _write(self.roots[0] / "cgroup.subtree_control", "+cpu +memory +pids")
        self.controller_dir = {
            c: (CGROUP_MOUNT / c).resolve() / root_name for c in V1_CONTROLLERS
        }

    def create(self, name: str, cores: float, memory_mb: int) -> list[Path]:
        """Make the task's directories and write its limits; returns the dirs."""
        quota = max(1000, round(cores * CPU_PERIOD_US))
        limit = str(memory_mb * MIB)
        dirs = [root / name for root in self.roots]
        for directory in dirs:
            directory.mkdir()
        if self.v2:
            task = dirs[0]
            _write(task / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(task / "memory.max", limit)
            _write(task / "memory.swap.max", "0")
            _write(task / "pids.max", "4096")
            return dirs
        cpu, memory = self.controller_dir["cpu"], self.controller_dir["memory"]
        _write(cpu / name / "cpu.cfs_quota_us", str(quota))
        _write(memory / name / "memory.limit_in_bytes", limit)
        memsw = memory / name / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, limit)
        _write(self.controller_dir["pids"] / name / "pids.max", "4096")
        return dirs

    @staticmethod
    async def remove(dirs: Sequence[Path]) -> None:
        """rmdir each, retrying briefly while the kernel still counts the process."""
        for directory in dirs:
            for _ in range(200):
                try:
                    directory.rmdir()
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    await asyncio.sleep(0.001)

    def close(self) -> None:
        for root in self.roots:
            root.rmdir()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _joiner(dirs: Sequence[Path]) -> Any:
    procs = [str(d / "cgroup.procs") for d in dirs]

    def join() -> None:
        for path in procs:
            with open(path, "w") as f:
                f.write("0")

    return join


async def _spawn(cgroups: PlainCgroups | None, name: str, cores: float) -> None:
    if cgroups is None:
        proc = await asyncio.create_subprocess_exec("/bin/true")
        await proc.wait()
        return
    dirs = cgroups.create(name, cores, 16)
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/true", preexec_fn=_joiner(dirs)
        )
        await proc.wait()
    finally:
        await cgroups.remove(dirs)


async def _latency(cgroups: PlainCgroups | None, count: int, cores: float) -> Any:
    times = []
    for i in range(count):
        start = time.perf_counter()
        await _spawn(cgroups, f"lat-{i}", cores)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "seconds": times}


async def _rate(
    cgroups: PlainCgroups | None, count: int, in_flight: int, cores: float
) -> Any:
    pending = iter(range(count))

    async def worker() -> None:
        for i in pending:
            await _spawn(cgroups, f"rate-{i}", cores)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    return {"per_second": count / elapsed, "seconds": elapsed}


async def _main(args: argparse.Namespace) -> Any:
    cgroups = PlainCgroups(args.cgroup) if args.cgroup else None
    try:
        if args.kind == "latency":
            return await _latency(cgroups, args.count, args.cores)
        return await _rate(cgroups, args.count, args.in_flight, args.cores)
    finally:
        if cgroups is not None:
            cgroups.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines")
    parser.add_argument("kind", choices=("latency", "rate"))
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--cores", type=float, default=1.0)
    parser.add_argument("--cgroup", metavar="ROOT", help="spawn in cgroups under ROOT")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args))))


async def measure(kind: str, *options: str) -> dict[str, Any]:
    """Run one baseline in its own Python process and return what it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.baselines",
        kind,
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"baseline {kind} {' '.join(options)} failed: {err!r}")
    result: dict[str, Any] = json.loads(out)
    return result


async def pipe_rate(seconds: float) -> float:
    """Bytes per second from ``yes`` through a pipe into ``wc -c``, for ``seconds``."""
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f"timeout {seconds:g} yes | wc -c",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    elapsed = time.perf_counter() - start
    return int(out) / elapsed


if __name__ == "__main__":
    main()
