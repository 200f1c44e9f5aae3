"""``python -m bench``: start a runner, measure every figure, print and save them."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import figures, resources
from bench.process import CGROUP_MOUNT, RunnerProcess, leftover_cgroups
from bench.profile import py_spy
from bench.report import Figure, render, to_json, write

logger = logging.getLogger("bench")

GROUPS = ("memory", "latency", "throughput", "flood", "idle", "exec")
MAX_OUTPUT_BYTES = 1 << 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure a real daggyr runner against baselines taken in the "
        "same run; print one table and write it as JSON.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results/bench.json"), metavar="FILE"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated figure groups, of: {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="record the runner with py-spy during the throughput figure "
        "(collapsed stacks into FILE)",
    )
    return parser


class Bench:
    """One run: the runners, the settings, and the figures gathered so far."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.repeats: int = args.repeats
        self.workdir = workdir
        self.prefix = f"daggyr-bench-{secrets.token_hex(4)}"
        self.figures: list[Figure] = []
        self.leftovers: list[str] = []
        self.runner = RunnerProcess(workdir, self.prefix)
        self.bare_cgroup: str | None = None

    async def run(self, groups: list[str]) -> None:
        try:
            await self.runner.start()
            logger.info(
                "runner pid %d, enforcement %s",
                self.runner.pid,
                self.runner.enforcement,
            )
            if _can_make_cgroups() and self.runner.enforcement != "none":
                self.bare_cgroup = f"{self.prefix}-bare"
            await self._warm_up()
            for group in groups:
                await self._measure(group, getattr(self, f"_{group}"))
        finally:
            self.leftovers += await self.runner.stop()
            if self.bare_cgroup:
                self.leftovers += leftover_cgroups(self.bare_cgroup)

    async def _measure(self, group: str, step: Callable[[], Awaitable[Any]]) -> None:
        started = time.monotonic()
        try:
            found = await step()
        except Exception as exc:
            logger.exception("%s failed", group)
            found = Figure.missing(group, group, f"failed: {exc}")
        self.figures += found if isinstance(found, list) else [found]
        logger.info("%s: %.1f s", group, time.monotonic() - started)

    async def _warm_up(self) -> None:
        for client in (self.runner.grpc, self.runner.rest):
            assert client is not None
            for i in range(20):
                task_id = f"warm-{client.protocol}-{i}"
                await client.submit(task_id, figures.TRUE_SMALL)
                await client.wait(task_id)

    async def _memory(self) -> Figure:
        return await resources.memory(self.runner, self.workdir, 10_000, 32)

    async def _latency(self) -> list[Figure]:
        return await figures.latency(self.runner, self.repeats, 300, self.bare_cgroup)

    async def _throughput(self) -> list[Figure]:
        async with py_spy(self.runner.pid, self.args.profile):
            return await figures.throughput(
                self.runner, self.repeats, 2000, 32, self.bare_cgroup
            )

    async def _flood(self) -> list[Figure]:
        return await resources.flood(self.runner, self.repeats, 4, MAX_OUTPUT_BYTES)

    async def _idle(self) -> list[Figure]:
        return await resources.idle(self.runner, 3, 10 / 3, 100)

    async def _exec(self) -> Figure:
        without = RunnerProcess(self.workdir, f"{self.prefix}-off", cgroups=False)
        try:
            await without.start()
            return await figures.exec_delay(self.runner, without, self.repeats, 50)
        finally:
            self.leftovers += await without.stop()


def _can_make_cgroups() -> bool:
    if os.geteuid() != 0:
        return False
    v2 = (CGROUP_MOUNT / "cgroup.controllers").exists()
    return v2 or (CGROUP_MOUNT / "memory").is_dir()


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _meta(bench: Bench, started: float, load_before: float) -> dict[str, Any]:
    return {
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "duration_seconds": round(time.time() - started, 1),
        "commit": _commit(),
        "repeats": bench.repeats,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "enforcement": bench.runner.enforcement,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "runner": {
            "capacity": {"cores": 2, "memory_mb": 8192},
            "max_output_bytes": MAX_OUTPUT_BYTES,
        },
        "leftover_cgroups": bench.leftovers,
    }


def main() -> int:
    args = _parser().parse_args()
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        _parser().error(f"unknown figure group(s): {', '.join(unknown)}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s bench: %(message)s", stream=sys.stderr
    )

    started, load_before = time.time(), os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="daggyr-bench-"))
    bench = Bench(args, workdir)
    try:
        asyncio.run(bench.run(groups))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    meta = _meta(bench, started, load_before)
    heading = (
        f"daggyr bench {meta['commit']}: {bench.repeats} repeats, "
        f"{meta['cpus']} CPUs, Linux {meta['kernel']}, enforcement "
        f"{meta['enforcement']}, load {load_before:.2f} -> "
        f"{meta['load_average_after']:.2f}, {meta['duration_seconds']:.0f} s"
    )
    print(render(bench.figures, heading))
    write(args.out, to_json(bench.figures, meta))
    print(f"written to {args.out}")
    if bench.leftovers:
        print(f"cgroups left behind: {', '.join(bench.leftovers)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
