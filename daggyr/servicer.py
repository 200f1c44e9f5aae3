"""The one servicer behind both protocols: each RPC by its proto name.

It takes and returns protobuf messages and raises the project's exceptions;
the gRPC server and the REST shim each convert those at their own boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from daggyr.runner import Runner
from daggyr.v1 import runner_pb2, task_pb2

__all__ = ["RunnerServicer"]


class RunnerServicer:
    """daggyr.v1.Runner, implemented over the core."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def GetCapacity(
        self, request: runner_pb2.GetCapacityRequest
    ) -> task_pb2.CapacityReport:
        return self.runner.capacity()

    async def SubmitTask(
        self, request: runner_pb2.SubmitTaskRequest
    ) -> task_pb2.TaskAttempt:
        return self.runner.submit(request.task_id, request.task)

    async def GetTask(self, request: runner_pb2.GetTaskRequest) -> task_pb2.TaskAttempt:
        return await self.runner.get(request.task_id, request.wait_seconds)

    async def CancelTask(
        self, request: runner_pb2.CancelTaskRequest
    ) -> task_pb2.TaskAttempt:
        return await self.runner.cancel(request.task_id)

    async def DeleteTask(
        self, request: runner_pb2.DeleteTaskRequest
    ) -> task_pb2.TaskAttempt:
        return await self.runner.delete(request.task_id)

    async def ListTasks(
        self, request: runner_pb2.ListTasksRequest
    ) -> runner_pb2.ListTasksResponse:
        tasks, token = self.runner.list(
            request.state, request.page_size, request.page_token
        )
        return runner_pb2.ListTasksResponse(tasks=tasks, next_page_token=token)

    async def WatchTask(
        self, request: runner_pb2.WatchTaskRequest
    ) -> AsyncIterator[task_pb2.TaskAttempt]:
        async for attempt in self.runner.watch(request.task_id):
            yield attempt
