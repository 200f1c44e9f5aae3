"""The task table: every task the runner holds, its latest attempt, its waiters.

An attempt is an immutable snapshot: each transition publishes a new one, so a
reply being serialised never sees a half-updated task. Every waiter owns its
own Event, so one waiter's timeout or disconnect never disturbs another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from daggyr.capacity import Resources
from daggyr.errors import InvalidArgument, NotFound
from daggyr.v1 import task_pb2

if TYPE_CHECKING:
    from daggyr.executor import Execution

__all__ = ["FINAL_STATES", "TaskRecord", "TaskTable"]

State = task_pb2.State
FINAL_STATES = frozenset(
    {
        State.SUCCEEDED,
        State.FAILED,
        State.CANCELLED,
        State.TIMED_OUT,
        State.OUT_OF_MEMORY,
        State.SYSTEM_ERROR,
    }
)
_LIST_CLEARED = ("output_log", "error_log", "executor_log")
# A page also ends before it passes this many bytes, so that it fits the 4 MiB
# message limit gRPC clients have by default, whatever the tasks' argv.
PAGE_BYTES = 2 << 20


class TaskRecord:
    """One held task: what was asked, its latest attempt, who waits on it."""

    __slots__ = (
        "attempt",
        "execution",
        "expiry",
        "needs",
        "overtaken",
        "seq",
        "submitted",
        "task",
        "task_id",
        "waiters",
    )

    def __init__(
        self, task_id: str, seq: int, task: task_pb2.Task, submitted: float
    ) -> None:
        self.task_id = task_id
        self.seq = seq
        self.task = task
        self.needs = Resources.of(task.cores, task.memory_mb)
        self.submitted = submitted
        self.overtaken = 0
        self.attempt = task_pb2.TaskAttempt()
        self.execution: Execution | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.waiters: set[asyncio.Event] = set()

    @property
    def final(self) -> bool:
        return self.attempt.state in FINAL_STATES

    def publish(self, attempt: task_pb2.TaskAttempt) -> None:
        """Make ``attempt`` the current one and wake every waiter."""
        self.attempt = attempt
        for event in self.waiters:
            event.set()

    async def changed(self, seen: task_pb2.TaskAttempt, timeout: float | None) -> bool:
        """Wait until the attempt is no longer ``seen``; False on timeout."""
        if self.attempt is not seen:
            return True
        event = asyncio.Event()
        self.waiters.add(event)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self.waiters.discard(event)


class TaskTable:
    """Task records by id, in submission order."""

    def __init__(self) -> None:
        self._records: dict[str, TaskRecord] = {}
        self._next_seq = 1

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[TaskRecord]:
        """A snapshot: the table may change while the caller iterates."""
        return iter(list(self._records.values()))

    def find(self, task_id: str) -> TaskRecord | None:
        return self._records.get(task_id)

    def get(self, task_id: str) -> TaskRecord:
        """The record, or NotFound naming the id."""
        record = self._records.get(task_id)
        if record is None:
            raise NotFound(f"task {task_id!r} not found")
        return record

    def add(self, task_id: str, task: task_pb2.Task, submitted: float) -> TaskRecord:
        record = TaskRecord(task_id, self._next_seq, task, submitted)
        self._next_seq += 1
        self._records[task_id] = record
        return record

    def remove(self, record: TaskRecord) -> None:
        """Forget the record; a second call does nothing."""
        if self._records.get(record.task_id) is record:
            del self._records[record.task_id]
        if record.expiry is not None:
            record.expiry.cancel()
            record.expiry = None

    def page(
        self, states: Iterable[int], page_size: int, page_token: str
    ) -> tuple[list[task_pb2.TaskAttempt], str]:
        """One page of attempts without logs, and the token for the next.

        A page holds at most ``page_size`` attempts and about PAGE_BYTES.

        Pages follow submission order and the token holds the position reached,
        so tasks added or removed meanwhile never repeat or shift other tasks.
        """
        after = _decode_token(page_token)
        wanted = set(states)
        found: list[task_pb2.TaskAttempt] = []
        last_seq = 0
        more = False
        size = 0
        for record in self._records.values():
            if record.seq <= after:
                continue
            if wanted and record.attempt.state not in wanted:
                continue
            light = _without_logs(record.attempt)
            size += light.ByteSize()
            if len(found) == page_size or (found and size > PAGE_BYTES):
                more = True
                break
            found.append(light)
            last_seq = record.seq
        return found, _encode_token(last_seq) if more else ""


def _without_logs(attempt: task_pb2.TaskAttempt) -> task_pb2.TaskAttempt:
    light = task_pb2.TaskAttempt()
    light.CopyFrom(attempt)
    for name in _LIST_CLEARED:
        light.ClearField(name)
    return light


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        kind, _, number = raw.partition(":")
        if kind == "after" and number.isdigit():
            return int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArgument(
        "page_token is not one this runner issued: pass next_page_token unchanged"
    )
