"""Prometheus metrics of one runner, served as text at ``GET /metrics``.

Each Server owns its own CollectorRegistry, so several runners in one process
(as in the tests) never share or clash over a series. Gauges (tasks by state,
capacity, queue length) are read from the runner when scraped; counters and
histograms are fed by the runner's transition listeners and by the request
observers of both protocols.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daggyr.runner import Runner
from daggyr.table import FINAL_STATES, TaskRecord
from daggyr.v1 import task_pb2

__all__ = ["Metrics"]

State = task_pb2.State
_MIB = 1 << 20
# Waits in the queue range from nothing to hours when the runner is full.
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_RUN_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_STATES = [value.name for value in State.DESCRIPTOR.values if value.number]
_FINAL_NAMES = [State.Name(state) for state in sorted(FINAL_STATES)]


def _seconds(stamp: object) -> float:
    return stamp.ToNanoseconds() / 1e9  # type: ignore[attr-defined, no-any-return]


class _RunnerState(Collector):
    """The gauges, read from the runner at scrape time."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        runner = self.runner
        held = Tally(State.Name(r.attempt.state) for r in runner.table)
        tasks = GaugeMetricFamily(
            "daggyr_tasks", "Tasks held by the runner, by state", labels=["state"]
        )
        for name in _STATES:
            tasks.add_metric([name], held.get(name, 0))
        yield tasks

        yield _capacity(
            "daggyr_capacity_cores",
            "Cores offered to tasks: the total, and what running tasks leave free",
            runner.total.cores,
            runner.free.cores,
        )
        yield _capacity(
            "daggyr_capacity_memory_bytes",
            "Memory offered to tasks: the total, and what running tasks leave free",
            runner.total.memory_mb * _MIB,
            max(0, runner.free.memory_mb) * _MIB,
        )
        yield GaugeMetricFamily(
            "daggyr_queue_length",
            "Tasks waiting for capacity to start",
            value=len(runner.queue),
        )


def _capacity(name: str, help_text: str, total: float, free: float) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=["kind"])
    family.add_metric(["total"], total)
    family.add_metric(["free"], free)
    return family


class Metrics:
    """The runner's metrics in a registry of their own."""

    def __init__(self, runner: Runner) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_RunnerState(runner))
        self.finished = Counter(
            "daggyr_tasks_finished",
            "Tasks that reached a final state, by that state",
            ["state"],
            registry=self.registry,
        )
        for name in _FINAL_NAMES:
            self.finished.labels(name)
        self.oom_killed = Counter(
            "daggyr_oom_killed_tasks",
            "Finished tasks in whose cgroup the kernel OOM-killed a process",
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "daggyr_task_queue_seconds",
            "Time from submission to start, for tasks that started",
            buckets=_QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "daggyr_task_run_seconds",
            "Time from start to end, for tasks that ran",
            buckets=_RUN_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "daggyr_requests",
            "API requests answered, by protocol, RPC and gRPC status code",
            ["protocol", "rpc", "code"],
            registry=self.registry,
        )
        runner.listeners.append(self.on_transition)

    def on_transition(
        self, record: TaskRecord, before: int | None, attempt: task_pb2.TaskAttempt
    ) -> None:
        """Count a task's move into ``attempt.state``."""
        if attempt.state == State.RUNNING:
            waited = _seconds(attempt.start_time) - _seconds(attempt.submit_time)
            self.queue_seconds.observe(max(0.0, waited))
        elif attempt.state in FINAL_STATES:
            self.finished.labels(State.Name(attempt.state)).inc()
            if attempt.oom_killed:
                self.oom_killed.inc()
            if before == State.RUNNING:
                ran = _seconds(attempt.stop_time) - _seconds(attempt.start_time)
                self.run_seconds.observe(max(0.0, ran))

    def observer(self, protocol: str) -> Callable[[str, str], None]:
        """A request observer for rest.build_app or grpc_server.add_services."""
        requests = self.requests

        def observe(rpc: str, code: str) -> None:
            requests.labels(protocol, rpc, code).inc()

        return observe

    def route(self) -> web.RouteDef:
        """``GET /metrics`` in the Prometheus text format."""

        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(self.registry)
            return web.Response(
                body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
            )

        return web.get("/metrics", metrics)
