"""The benchmark's clients of one runner, one per protocol, behind one interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from google.protobuf import timestamp_pb2

from daggyr.v1 import runner_pb2, runner_pb2_grpc, task_pb2

__all__ = ["Client", "Final", "GrpcClient", "RestClient", "TaskSpec"]

FINAL_STATES = frozenset(
    {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "OUT_OF_MEMORY", "SYSTEM_ERROR"}
)
# The longest a single long-poll may wait (the runner's maximum).
WAIT_SECONDS = 60


@dataclass(frozen=True)
class TaskSpec:
    """What the benchmark submits: a command and what it reserves."""

    command: tuple[str, ...]
    cores: float
    memory_mb: int


@dataclass(frozen=True)
class Final:
    """What the benchmark reads from a final TaskAttempt; times in epoch seconds."""

    state: str
    output: str
    start: float
    stop: float


class Client(abc.ABC):
    """Submit, wait for, watch and cancel tasks over one protocol."""

    protocol: str

    @abc.abstractmethod
    async def submit(self, task_id: str, spec: TaskSpec) -> None:
        """SubmitTask; raises on any error."""

    @abc.abstractmethod
    async def wait(self, task_id: str) -> Final:
        """Long-poll GetTask until the attempt is final."""

    @abc.abstractmethod
    async def watch(self, task_id: str) -> Final:
        """Follow the task's changes until the final attempt (WatchTask)."""

    @abc.abstractmethod
    async def cancel(self, task_id: str) -> None:
        """CancelTask; returns once the task is final."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class GrpcClient(Client):
    protocol = "gRPC"

    def __init__(self, port: int) -> None:
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._stub = runner_pb2_grpc.RunnerStub(self._channel)

    async def submit(self, task_id: str, spec: TaskSpec) -> None:
        task = task_pb2.Task(
            command=spec.command, cores=spec.cores, memory_mb=spec.memory_mb
        )
        request = runner_pb2.SubmitTaskRequest(task_id=task_id, task=task)
        await self._stub.SubmitTask(request)

    async def wait(self, task_id: str) -> Final:
        request = runner_pb2.GetTaskRequest(task_id=task_id, wait_seconds=WAIT_SECONDS)
        while True:
            attempt = await self._stub.GetTask(request)
            if task_pb2.State.Name(attempt.state) in FINAL_STATES:
                return _final_of(attempt)

    async def watch(self, task_id: str) -> Final:
        request = runner_pb2.WatchTaskRequest(task_id=task_id)
        last = None
        async for attempt in self._stub.WatchTask(request):
            last = attempt
        if last is None:
            raise RuntimeError(f"WatchTask {task_id} ended without an attempt")
        return _final_of(last)

    async def cancel(self, task_id: str) -> None:
        await self._stub.CancelTask(runner_pb2.CancelTaskRequest(task_id=task_id))

    async def close(self) -> None:
        await self._channel.close()


class RestClient(Client):
    protocol = "REST"

    def __init__(self, port: int) -> None:
        self._base = f"http://127.0.0.1:{port}/api/v1/"
        # No connection limit: the idle figure holds 100 long-polls open at once.
        connector = aiohttp.TCPConnector(limit=0)
        self._http = aiohttp.ClientSession(connector=connector)

    async def submit(self, task_id: str, spec: TaskSpec) -> None:
        body = {
            "command": list(spec.command),
            "cores": spec.cores,
            "memory_mb": spec.memory_mb,
        }
        await self._call("POST", f"task/{task_id}", json=body)

    async def wait(self, task_id: str) -> Final:
        while True:
            url = f"task/{task_id}?wait_seconds={WAIT_SECONDS}"
            attempt = await self._call("GET", url)
            if attempt["state"] in FINAL_STATES:
                return _final_of_json(attempt)

    async def watch(self, task_id: str) -> Final:
        raise NotImplementedError("the benchmark watches over gRPC only")

    async def cancel(self, task_id: str) -> None:
        await self._call("POST", f"task/{task_id}:cancel", json={})

    async def capacity(self) -> Any:
        """GetCapacity's report as JSON."""
        return await self._call("GET", "capacity")

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._http.request(method, self._base + path, **kwargs) as reply:
            body = await reply.json()
            if reply.status != 200:
                raise RuntimeError(f"{method} {path}: {reply.status} {body}")
            return body


def _final_of(attempt: task_pb2.TaskAttempt) -> Final:
    return Final(
        task_pb2.State.Name(attempt.state),
        attempt.output_log,
        attempt.start_time.ToNanoseconds() / 1e9,
        attempt.stop_time.ToNanoseconds() / 1e9,
    )


def _final_of_json(attempt: dict[str, Any]) -> Final:
    return Final(
        attempt["state"],
        attempt.get("output_log", ""),
        _seconds(attempt.get("start_time")),
        _seconds(attempt.get("stop_time")),
    )


def _seconds(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    value = timestamp_pb2.Timestamp()
    value.FromJsonString(stamp)
    return value.ToNanoseconds() / 1e9
