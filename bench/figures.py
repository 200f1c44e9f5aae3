"""The time figures: latency, throughput, and submit-to-exec with and without cgroups.

Each repeat measures the baseline and then the runner, so that both see the
same state of the machine; the ratio is taken per repeat.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from bench.baselines import measure
from bench.clients import Client, Final, TaskSpec
from bench.process import RunnerProcess
from bench.report import Figure, Target, percentile

__all__ = ["exec_delay", "in_flight", "latency", "throughput"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

TRUE_ONE_CORE = TaskSpec(("/bin/true",), cores=1.0, memory_mb=16)
TRUE_SMALL = TaskSpec(("/bin/true",), cores=0.01, memory_mb=16)
DATE = TaskSpec(("date", "+%s.%N"), cores=1.0, memory_mb=16)


async def in_flight(
    items: Iterable[T], workers: int, call: Callable[[T], Awaitable[R]]
) -> list[R]:
    """``call`` on every item with at most ``workers`` calls in flight, in order."""
    indexed = list(enumerate(items))
    results: dict[int, R] = {}
    pending = iter(indexed)

    async def worker() -> None:
        for index, item in pending:
            results[index] = await call(item)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return [results[i] for i in range(len(indexed))]


def check_succeeded(finals: Sequence[Final], what: str) -> None:
    bad = [f.state for f in finals if f.state != "SUCCEEDED"]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} task(s) did not succeed: {bad[:5]}")


async def latency(
    runner: RunnerProcess, repeats: int, count: int, cgroup_root: str | None
) -> list[Figure]:
    """SubmitTask to the final attempt, one task at a time, over both protocols."""
    bare: list[float] = []
    bare_cgroup: list[float] = []
    bare_cgroup_p99: list[float] = []
    medians: dict[str, list[float]] = {"gRPC": [], "REST": []}
    p99s: dict[str, list[float]] = {"gRPC": [], "REST": []}
    for repeat in range(repeats):
        logger.info("latency: repeat %d of %d", repeat + 1, repeats)
        result = await measure("latency", "--count", str(count))
        bare.append(result["median"] * 1e3)
        if cgroup_root:
            options = ("--count", str(count), "--cgroup", cgroup_root)
            result = await measure("latency", *options)
            bare_cgroup.append(result["median"] * 1e3)
            bare_cgroup_p99.append(percentile(result["seconds"], 99) * 1e3)
        for client in _clients(runner):
            name = f"lat-{client.protocol}-{repeat}"
            times = await _sequential(client, name, count)
            medians[client.protocol].append(statistics.median(times) * 1e3)
            p99s[client.protocol].append(percentile(times, 99) * 1e3)

    figures = []
    for protocol in ("gRPC", "REST"):
        key, title = f"latency.{protocol.lower()}", f"latency {protocol}"
        for kind, values, limit in (("median", medians, 3.0), ("p99", p99s, 6.0)):
            figures.append(
                Figure(
                    f"{key}.{kind}",
                    f"{title} {kind}",
                    "ms",
                    values[protocol],
                    "bare spawn median",
                    "ms",
                    bare,
                    target=Target(f"<= {limit:g}x", "ratio", limit),
                )
            )
    if not bare_cgroup:
        title = "bare spawn in a cgroup"
        return [*figures, Figure.missing("latency.bare_cgroup", title, _NO_CGROUPS)]
    for kind, measured, note in (
        ("median", bare_cgroup, "what mkdir, limits, join and rmdir add to a spawn"),
        ("p99", bare_cgroup_p99, "the tail of joining a cgroup, for the p99 rows"),
    ):
        figures.append(
            Figure(
                f"latency.bare_cgroup.{kind}",
                f"bare spawn in a cgroup, {kind}",
                "ms",
                measured,
                "bare spawn median",
                "ms",
                bare,
                note=note,
            )
        )
    return figures


async def throughput(
    runner: RunnerProcess,
    repeats: int,
    count: int,
    workers: int,
    cgroup_root: str | None,
) -> list[Figure]:
    """Tasks per second with ``workers`` clients: all submitted, then all collected."""
    bare: list[float] = []
    bare_cgroup: list[float] = []
    rates: dict[str, list[float]] = {"gRPC": [], "REST": []}
    options = ("--count", str(count), "--in-flight", str(workers), "--cores", "0.01")
    for repeat in range(repeats):
        logger.info("throughput: repeat %d of %d", repeat + 1, repeats)
        bare.append((await measure("rate", *options))["per_second"])
        if cgroup_root:
            result = await measure("rate", *options, "--cgroup", cgroup_root)
            bare_cgroup.append(result["per_second"])
        for client in _clients(runner):
            name = f"tput-{client.protocol}-{repeat}"
            rates[client.protocol].append(
                await _throughput(client, name, count, workers)
            )

    figures = []
    for protocol in ("gRPC", "REST"):
        key = f"throughput.{protocol.lower()}"
        title = f"throughput {protocol}, {workers} clients"
        figures.append(
            Figure(
                key,
                title,
                "tasks/s",
                rates[protocol],
                f"bare spawns, {workers} in flight",
                "/s",
                bare,
                target=Target(">= 0.5x", "ratio", 0.5, at_most=False),
            )
        )
        title += ", vs cgroup spawns"
        figures.append(
            Figure(
                f"{key}.vs_cgroup",
                title,
                "tasks/s",
                rates[protocol],
                f"bare spawns in a cgroup, {workers} in flight",
                "/s",
                bare_cgroup,
            )
            if bare_cgroup
            else Figure.missing(f"{key}.vs_cgroup", title, _NO_CGROUPS)
        )
    return figures


async def exec_delay(
    with_cgroups: RunnerProcess,
    without: RunnerProcess | None,
    repeats: int,
    count: int,
) -> Figure:
    """Median time from SubmitTask to the command's first instruction (``date``)."""
    title = "submit to exec, median, cgroups on"
    if without is None or without.enforcement != "none":
        why = "no runner without cgroups could be started"
        return Figure.missing("exec_delay", title, why)
    on: list[float] = []
    off: list[float] = []
    for repeat in range(repeats):
        logger.info("submit to exec: repeat %d of %d", repeat + 1, repeats)
        for runner, into in ((with_cgroups, on), (without, off)):
            assert runner.grpc is not None
            delays = await _exec_delays(runner.grpc, f"exec-{repeat}", count)
            into.append(statistics.median(delays) * 1e3)
    return Figure(
        "exec_delay",
        title,
        "ms",
        on,
        "the same without cgroups",
        "ms",
        off,
        note="from the client's clock before SubmitTask to `date +%s.%N` in the task",
    )


_NO_CGROUPS = "cgroups cannot be created here (needs root and a cgroup mount)"


def _clients(runner: RunnerProcess) -> list[Client]:
    assert runner.grpc is not None and runner.rest is not None
    return [runner.grpc, runner.rest]


async def _sequential(client: Client, name: str, count: int) -> list[float]:
    times = []
    finals = []
    for i in range(count):
        task_id = f"{name}-{i}"
        start = time.perf_counter()
        await client.submit(task_id, TRUE_ONE_CORE)
        finals.append(await client.wait(task_id))
        times.append(time.perf_counter() - start)
    check_succeeded(finals, name)
    return times


async def _throughput(client: Client, name: str, count: int, workers: int) -> float:
    ids = [f"{name}-{i}" for i in range(count)]
    start = time.perf_counter()
    await in_flight(ids, workers, lambda task_id: client.submit(task_id, TRUE_SMALL))
    finals = await in_flight(ids, workers, client.wait)
    elapsed = time.perf_counter() - start
    check_succeeded(finals, name)
    return count / elapsed


async def _exec_delays(client: Client, name: str, count: int) -> list[float]:
    delays = []
    for i in range(count):
        task_id = f"{name}-{i}"
        submitted = time.time()
        await client.submit(task_id, DATE)
        final = await client.wait(task_id)
        check_succeeded([final], task_id)
        delays.append(float(final.output) - submitted)
    return delays
