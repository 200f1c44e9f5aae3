"""What the runner holds and burns: memory per result, an output flood, idle CPU."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

from bench.baselines import pipe_rate
from bench.clients import Client, TaskSpec
from bench.figures import check_succeeded, in_flight
from bench.process import RunnerProcess
from bench.report import Figure, Target

__all__ = ["flood", "idle", "memory"]

logger = logging.getLogger(__name__)

MIB = 1 << 20
KIB = 1024
_MARKER = re.compile(r"\n\[daggyr: (\d+) bytes dropped\]\n")
_RSS_SAMPLE_SECONDS = 0.05


async def memory(
    runner: RunnerProcess, workdir: Path, count: int, workers: int
) -> Figure:
    """RSS held per finished task of 1 KiB output, against the 1 KiB it holds."""
    client = _grpc(runner)
    source = workdir / "one-kib.txt"
    source.write_bytes(b"x" * KIB)
    spec = TaskSpec(("head", "-c", str(KIB), str(source)), cores=0.01, memory_mb=16)
    ids = [f"mem-{i}" for i in range(count)]

    before = runner.rss()
    logger.info("memory: %d tasks of %d bytes output", count, KIB)
    await in_flight(ids, workers, lambda task_id: client.submit(task_id, spec))
    finals = await in_flight(ids, workers, client.wait)
    check_succeeded(finals, "memory")
    short = [f for f in finals if len(f.output) != KIB]
    if short:
        raise RuntimeError(f"memory: {len(short)} task(s) did not print {KIB} bytes")
    # Let replies in flight be freed before reading the resident size.
    await asyncio.sleep(1.0)
    after = runner.rss()

    per_result = (after - before) / count
    return Figure(
        "memory.per_result",
        f"RSS per held result ({count} held)",
        "B",
        [per_result],
        "output bytes held",
        "B",
        [float(KIB)],
        target=Target("<= +2 KiB", "excess", 2 * KIB),
        extra={"rss_before": before, "rss_after": after, "tasks": count},
    )


async def flood(
    runner: RunnerProcess, repeats: int, seconds: float, cap: int
) -> list[Figure]:
    """A task writing `yes` flat out: the runner's RSS growth and drain rate."""
    spec = TaskSpec(("timeout", f"{seconds:g}", "yes"), cores=1.0, memory_mb=64)
    client = _grpc(runner)
    growths: list[float] = []
    drains: list[float] = []
    pipes: list[float] = []
    for repeat in range(repeats):
        logger.info("flood: repeat %d of %d", repeat + 1, repeats)
        pipes.append(await pipe_rate(seconds) / 1e6)
        growth, drained = await _flood_once(runner, client, f"flood-{repeat}", spec)
        growths.append(growth / MIB)
        drains.append(drained / 1e6)

    limit = (2 * cap + 8 * MIB) / MIB
    return [
        Figure(
            "flood.rss_growth",
            f"flood ({seconds:g} s of yes): peak RSS growth",
            "MiB",
            growths,
            "max_output_bytes",
            "MiB",
            [cap / MIB] * repeats,
            target=Target(f"< {limit:g} MiB", "value", limit),
        ),
        Figure(
            "flood.drain_rate",
            "flood: rate drained from the task",
            "MB/s",
            drains,
            "yes | wc -c",
            "MB/s",
            pipes,
            target=Target(">= 0.5x", "ratio", 0.5, at_most=False),
        ),
    ]


async def idle(
    runner: RunnerProcess, windows: int, window_seconds: float, pollers: int
) -> list[Figure]:
    """The runner's own CPU with nothing to do, then with long-pollers waiting."""
    await asyncio.sleep(1.0)
    logger.info("idle: %d windows of %.1f s", windows, window_seconds)
    quiet = [await _cpu_percent(runner, window_seconds) for _ in range(windows)]

    assert runner.grpc is not None and runner.rest is not None
    grpc, rest = runner.grpc, runner.rest
    spec = TaskSpec(("sleep", "30"), cores=0.01, memory_mb=16)
    ids = [f"idle-{i}" for i in range(pollers)]
    await in_flight(ids, 32, lambda task_id: grpc.submit(task_id, spec))
    await _wait_running(runner, pollers)
    # Half long-poll GetTask over REST, half follow WatchTask over gRPC.
    polls = [
        asyncio.ensure_future(rest.wait(i) if n % 2 else grpc.watch(i))
        for n, i in enumerate(ids)
    ]
    await asyncio.sleep(1.0)
    logger.info("idle: %d tasks running, %d clients waiting", pollers, pollers)
    busy = [await _cpu_percent(runner, window_seconds) for _ in range(windows)]
    await in_flight(ids, 32, grpc.cancel)
    finals = await asyncio.gather(*polls)
    if any(f.state != "CANCELLED" for f in finals):
        raise RuntimeError("idle: a long-polled task did not end CANCELLED")

    core = [100.0] * windows
    return [
        Figure(
            "idle.cpu",
            "idle runner CPU",
            "% core",
            quiet,
            "one core",
            "%",
            core,
            target=Target("< 1%", "value", 1.0),
        ),
        Figure(
            "idle.cpu_pollers",
            f"CPU with {pollers} long-pollers",
            "% core",
            busy,
            "one core",
            "%",
            core,
            target=Target("< 5%", "value", 5.0),
            note=f"{pollers} `sleep 30` tasks; half GetTask long-polls, half WatchTask",
        ),
    ]


def _grpc(runner: RunnerProcess) -> Client:
    assert runner.grpc is not None
    return runner.grpc


async def _flood_once(
    runner: RunnerProcess, client: Client, task_id: str, spec: TaskSpec
) -> tuple[int, float]:
    """(peak RSS growth in bytes, bytes per second the runner read)."""
    before = runner.rss()
    peak = before
    await client.submit(task_id, spec)
    waiting = asyncio.ensure_future(client.wait(task_id))
    while not waiting.done():
        peak = max(peak, runner.rss())
        await asyncio.wait([waiting], timeout=_RSS_SAMPLE_SECONDS)
    final = waiting.result()
    peak = max(peak, runner.rss())

    match = _MARKER.search(final.output)
    if match is None:
        raise RuntimeError(f"flood: no truncation marker in {task_id}'s output")
    kept = len(final.output.encode()) - len(match.group(0).encode())
    written = int(match.group(1)) + kept
    return peak - before, written / (final.stop - final.start)


async def _cpu_percent(runner: RunnerProcess, seconds: float) -> float:
    """The runner's CPU time over ``seconds`` of wall time, in % of one core."""
    cpu, wall = runner.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    used = runner.cpu_seconds() - cpu
    return 100 * used / (time.monotonic() - wall)


async def _wait_running(runner: RunnerProcess, count: int) -> None:
    assert runner.rest is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        report = await runner.rest.capacity()
        if report.get("running_tasks", 0) >= count:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"idle: {count} tasks were not all running after 30 s")
