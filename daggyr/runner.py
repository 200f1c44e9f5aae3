"""The runner's core: admission, the queue with backfill, and each task's life.

It owns the task table and the executor, speaks only in protobuf messages and
the project's exceptions, and imports neither grpc nor aiohttp: the gRPC
servicer and the REST shim are thin layers over it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable

from google.protobuf import timestamp_pb2

from daggyr.capacity import Resources
from daggyr.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from daggyr.executor import Executor, Outcome
from daggyr.table import FINAL_STATES, TaskRecord, TaskTable
from daggyr.v1 import task_pb2
from daggyr.validation import normalized_task, validate_task_id

__all__ = ["MAX_PAGE_SIZE", "MAX_WAIT_SECONDS", "Runner", "Transition"]

logger = logging.getLogger(__name__)

State = task_pb2.State
MAX_WAIT_SECONDS = 60
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# A transition listener gets the record, the state it left (None when new)
# and the attempt it entered.
Transition = Callable[[TaskRecord, "int | None", task_pb2.TaskAttempt], None]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def disk_name(seq: int, task_id: str) -> str:
    """The task's cgroup and temporary directory name: one path component.

    The sequence number makes it injective; the percent-encoded id (no '/',
    so never '.' or '..') is only there for the people reading it.
    """
    return f"{seq}-{urllib.parse.quote(task_id, safe='')[:120]}"


class Runner:
    """Tasks accepted, queued, running and finished, behind one set of methods."""

    def __init__(
        self,
        executor: Executor,
        total: Resources,
        *,
        default_memory_mb: int,
        max_queued_tasks: int,
        max_backfill_overtakes: int,
        result_ttl_seconds: float,
    ) -> None:
        self.executor = executor
        self.total = total
        self.default_memory_mb = default_memory_mb
        self.max_queued_tasks = max_queued_tasks
        self.max_backfill_overtakes = max_backfill_overtakes
        self.result_ttl_seconds = result_ttl_seconds
        self.table = TaskTable()
        self.reserved = Resources(0, 0)
        self.queue: list[TaskRecord] = []
        self.running: set[TaskRecord] = set()
        self.listeners: list[Transition] = []
        self._finishing: set[asyncio.Task[None]] = set()
        self._accepting = True

    # -- what the RPCs call ---------------------------------------------------

    def submit(self, task_id: str, task: task_pb2.Task) -> task_pb2.TaskAttempt:
        """Accept ``task`` and return its attempt, QUEUED or RUNNING.

        Idempotent: the same id with an identical task returns the attempt held;
        a different task under a held id is AlreadyExists.
        """
        validate_task_id(task_id)
        task = normalized_task(task, self.default_memory_mb)

        held = self.table.find(task_id)
        if held is not None:
            if held.task == task:
                return held.attempt
            raise AlreadyExists(
                f"task {task_id!r} is already held with a different task: "
                "delete it first or choose another task_id"
            )
        if not self._accepting:
            raise Unavailable("the runner is shutting down: submit elsewhere")
        needs = Resources.of(task.cores, task.memory_mb)
        self._check_fits_total(needs)
        if len(self.queue) >= self.max_queued_tasks:
            raise ResourceExhausted(
                f"the queue is full ({self.max_queued_tasks} tasks): retry later"
            )

        queued = task_pb2.TaskAttempt(
            task_id=task_id,
            state=State.QUEUED,
            submit_time=_timestamp(time.time()),
            task=task,
        )
        record = self.table.add(queued)
        self._notify(record, None, queued)
        self.queue.append(record)
        self._pump()
        return record.attempt

    async def get(self, task_id: str, wait_seconds: float = 0) -> task_pb2.TaskAttempt:
        """The current attempt; with ``wait_seconds``, once final or when it ends."""
        if wait_seconds > MAX_WAIT_SECONDS:
            raise OutOfRange(
                f"wait_seconds must be at most {MAX_WAIT_SECONDS} (got {wait_seconds})"
            )
        record = self._record(task_id)
        deadline = time.monotonic() + wait_seconds
        while not record.final:
            left = deadline - time.monotonic()
            if left <= 0 or not await record.changed(record.attempt, left):
                break
        return record.attempt

    async def cancel(self, task_id: str) -> task_pb2.TaskAttempt:
        """Stop the task and return its final attempt; a finished task is unchanged."""
        record = self._record(task_id)
        await self._stop(record, State.CANCELLED, "cancelled by the client")
        return record.attempt

    async def delete(self, task_id: str) -> task_pb2.TaskAttempt:
        """Cancel the task if needed, then forget it; returns its last attempt."""
        record = self._record(task_id)
        await self._stop(record, State.CANCELLED, "cancelled by DeleteTask")
        self.table.remove(record)
        logger.info(
            "task %s deleted", task_id, extra={"task_id": task_id, "event": "deleted"}
        )
        return record.attempt

    def list(
        self, states: Iterable[int], page_size: int, page_token: str
    ) -> tuple[list[task_pb2.TaskAttempt], str]:
        """One page of held tasks without logs; page_size is clamped to 1..1000."""
        wanted = list(states)
        for state in wanted:
            if state not in State.values() or state == State.STATE_UNSPECIFIED:
                raise InvalidArgument(f"state {state} is not a task state")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        return self.table.page(wanted, size, page_token)

    async def watch(self, task_id: str) -> AsyncIterator[task_pb2.TaskAttempt]:
        """Each new attempt of the task, from the current one to the final one."""
        record = self._record(task_id)
        seen = record.attempt
        yield seen
        while seen.state not in FINAL_STATES:
            await record.changed(seen, None)
            seen = record.attempt
            yield seen

    def capacity(self) -> task_pb2.CapacityReport:
        """Total and free capacity, counts and the enforcement mode."""
        free = self.free
        cgroups = self.executor.cgroups
        return task_pb2.CapacityReport(
            total=task_pb2.Capacity(
                cores=self.total.cores, memory_mb=self.total.memory_mb
            ),
            free=task_pb2.Capacity(cores=free.cores, memory_mb=max(0, free.memory_mb)),
            running_tasks=len(self.running),
            queued_tasks=len(self.queue),
            enforcement=cgroups.mode,
            enforcement_reason=cgroups.reason,
        )

    @property
    def free(self) -> Resources:
        return self.total - self.reserved

    # -- shutdown ---------------------------------------------------------------

    async def shutdown(self) -> None:
        """Refuse new tasks, cancel every held one and wait for all to end.

        A second call while the first waits cuts every task's grace short.
        """
        self._accepting = False
        for record in list(self.queue) + list(self.running):
            if record.execution is not None:
                record.execution.stop(State.CANCELLED, "the runner is shutting down")
            else:
                self._finish_unstarted(record, "the runner is shutting down")
        while self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        self.table.close()

    # -- internals --------------------------------------------------------------

    def _record(self, task_id: str) -> TaskRecord:
        return self.table.get(validate_task_id(task_id))

    def _check_fits_total(self, needs: Resources) -> None:
        total = self.total
        if needs.micro_cores > total.micro_cores:
            raise FailedPrecondition(
                f"task needs {needs.cores:g} cores but this runner has "
                f"{total.cores:g} in total"
            )
        if needs.memory_mb > total.memory_mb:
            raise FailedPrecondition(
                f"task needs memory_mb {needs.memory_mb} but this runner has "
                f"{total.memory_mb} in total"
            )

    def _pump(self) -> None:
        """Start queued tasks that fit, in order, with bounded backfill.

        A later task may start ahead of an earlier one that does not fit yet,
        but once a waiting task has been overtaken max_backfill_overtakes
        times, nothing behind it starts before it does.
        """
        if not self._accepting:
            return  # shutting down: nothing new starts
        waiting: list[TaskRecord] = []
        keep: list[TaskRecord] = []
        blocked = False
        for record in self.queue:
            if not blocked and record.needs.fits_in(self.free):
                for earlier in waiting:
                    earlier.overtaken += 1
                self._start(record)
                continue
            keep.append(record)
            waiting.append(record)
            if record.overtaken >= self.max_backfill_overtakes:
                blocked = True
        self.queue = keep

    def _start(self, record: TaskRecord) -> None:
        self.reserved += record.needs
        self.running.add(record)
        name = disk_name(record.seq, record.task_id)
        execution = self.executor.execution(record.task_id, name, record.task)
        record.execution = execution
        started = execution.start()
        if started:
            running = task_pb2.TaskAttempt()
            running.CopyFrom(record.attempt)
            running.state = State.RUNNING
            running.start_time.CopyFrom(_timestamp(execution.start_time))
            running.executor_log = "\n".join(execution.log)
            self._publish(record, running)
        waiter = asyncio.ensure_future(self._finish(record))
        self._finishing.add(waiter)
        waiter.add_done_callback(self._finishing.discard)

    async def _finish(self, record: TaskRecord) -> None:
        execution = record.execution
        assert execution is not None
        try:
            outcome = await execution.wait()
        except Exception as exc:  # the runner must outlive any task
            logger.exception("task %s: executor failed", record.task_id)
            outcome = Outcome(
                State.SYSTEM_ERROR, time.time(), time.time(), log=[f"executor: {exc}"]
            )
        self.running.discard(record)
        self.reserved -= record.needs
        self._publish(record, self._final_attempt(record, outcome))
        # The final attempt holds all that is kept; the execution (its output
        # buffers, process handle, cgroup paths) would otherwise live as long
        # as the result, several KiB per held task.
        record.execution = None
        self._retain(record)
        self._pump()
        # Nothing of the task runs any more: its cgroup and directory go now,
        # after the result is out (shutdown still waits for this).
        await execution.cleanup()

    def _final_attempt(
        self, record: TaskRecord, outcome: Outcome
    ) -> task_pb2.TaskAttempt:
        final = task_pb2.TaskAttempt()
        final.CopyFrom(record.attempt)
        final.state = outcome.state
        final.start_time.CopyFrom(_timestamp(outcome.start_time))
        final.stop_time.CopyFrom(_timestamp(outcome.stop_time))
        final.expire_time.CopyFrom(
            _timestamp(outcome.stop_time + self.result_ttl_seconds)
        )
        if outcome.exit_code is not None:
            final.exit_code = outcome.exit_code
        final.signal = outcome.signal
        final.output_log = outcome.output
        final.error_log = outcome.error
        final.output_truncated = outcome.truncated
        final.executor_log = "\n".join(outcome.log)
        if outcome.usage is not None:
            final.peak_memory_mb = outcome.usage.peak_memory_mb
            final.cpu_seconds = outcome.usage.cpu_seconds
            final.throttled_seconds = outcome.usage.throttled_seconds
            final.oom_killed = outcome.usage.oom_kills > 0
        if outcome.limits is not None:
            final.limits.cores = outcome.limits.cores
            final.limits.memory_mb = outcome.limits.memory_mb
            final.limits.pids = outcome.limits.pids
        # Held until it expires: re-parsed, it sits in one tight protobuf arena
        # instead of the grown one CopyFrom left (about 0.7 KiB less per result,
        # for about 1 µs).
        return task_pb2.TaskAttempt.FromString(final.SerializeToString())

    async def _stop(self, record: TaskRecord, state: int, reason: str) -> None:
        if record.final:
            return
        if record.execution is None:
            self._finish_unstarted(record, reason)
            return
        record.execution.stop(state, reason)
        while not record.final:
            await record.changed(record.attempt, None)

    def _finish_unstarted(self, record: TaskRecord, reason: str) -> None:
        """End a task that never left the queue."""
        if record in self.queue:
            self.queue.remove(record)
        now = time.time()
        final = task_pb2.TaskAttempt()
        final.CopyFrom(record.attempt)
        final.state = State.CANCELLED
        final.stop_time.CopyFrom(_timestamp(now))
        final.expire_time.CopyFrom(_timestamp(now + self.result_ttl_seconds))
        final.executor_log = reason
        self._publish(record, final)
        self._retain(record)
        self._pump()

    def _retain(self, record: TaskRecord) -> None:
        self.table.retain(record, self.result_ttl_seconds)

    def _publish(self, record: TaskRecord, attempt: task_pb2.TaskAttempt) -> None:
        before = record.attempt.state
        record.publish(attempt)
        self._notify(record, before, attempt)

    def _notify(
        self, record: TaskRecord, before: int | None, attempt: task_pb2.TaskAttempt
    ) -> None:
        _log_transition(record, attempt)
        for listener in self.listeners:
            listener(record, before, attempt)


def _log_transition(record: TaskRecord, attempt: task_pb2.TaskAttempt) -> None:
    state = State.Name(attempt.state)
    fields = {"task_id": record.task_id, "state": state}
    if attempt.state == State.QUEUED:
        logger.info(
            "task %s submitted: cores=%g memory_mb=%d",
            record.task_id,
            record.task.cores,
            record.task.memory_mb,
            extra=fields,
        )
    elif attempt.state == State.RUNNING:
        logger.info("task %s started", record.task_id, extra=fields)
    else:
        exit_code = attempt.exit_code if attempt.HasField("exit_code") else None
        duration = 0.0
        if attempt.HasField("start_time"):
            duration = (
                attempt.stop_time.ToNanoseconds() - attempt.start_time.ToNanoseconds()
            ) / 1e9
        logger.info(
            "task %s finished: state=%s exit_code=%s signal=%d peak_memory_mb=%.1f "
            "duration=%.3fs",
            record.task_id,
            state,
            exit_code,
            attempt.signal,
            attempt.peak_memory_mb,
            duration,
            extra={
                **fields,
                "exit_code": exit_code,
                "peak_memory_mb": attempt.peak_memory_mb,
                "duration_seconds": duration,
            },
        )
