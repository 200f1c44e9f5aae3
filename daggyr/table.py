"""The task table: every task the runner holds, its latest attempt, its waiters.

An attempt is an immutable snapshot: each transition publishes a new one, so a
reply being serialised never sees a half-updated task. Every waiter owns its
own Event, so one waiter's timeout or disconnect never disturbs another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import time
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
    """One held task: its latest attempt (which carries the task) and waiters.

    Kept small on purpose: a runner may hold many thousands of results.
    """

    __slots__ = ("attempt", "execution", "expires", "overtaken", "seq", "waiters")

    def __init__(self, seq: int, attempt: task_pb2.TaskAttempt) -> None:
        self.seq = seq
        self.attempt = attempt
        self.overtaken = 0
        self.execution: Execution | None = None
        self.expires = 0.0  # monotonic time the result is dropped; 0 while live
        self.waiters: set[asyncio.Event] | None = None

    @property
    def task_id(self) -> str:
        return str(self.attempt.task_id)

    @property
    def task(self) -> task_pb2.Task:
        return self.attempt.task

    @property
    def needs(self) -> Resources:
        return Resources.of(self.attempt.task.cores, self.attempt.task.memory_mb)

    @property
    def submitted(self) -> float:
        return float(self.attempt.submit_time.ToNanoseconds()) / 1e9

    @property
    def final(self) -> bool:
        return self.attempt.state in FINAL_STATES

    def publish(self, attempt: task_pb2.TaskAttempt) -> None:
        """Make ``attempt`` the current one and wake every waiter."""
        self.attempt = attempt
        for event in self.waiters or ():
            event.set()

    async def changed(self, seen: task_pb2.TaskAttempt, timeout: float | None) -> bool:
        """Wait until the attempt is no longer ``seen``; False on timeout."""
        if self.attempt is not seen:
            return True
        event = asyncio.Event()
        if self.waiters is None:
            self.waiters = set()
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
        self._expiring: collections.deque[TaskRecord] = collections.deque()
        self._dead = 0  # records in _expiring that were removed before expiry
        self._timer: asyncio.TimerHandle | None = None

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

    def add(self, attempt: task_pb2.TaskAttempt) -> TaskRecord:
        """Hold a new task under ``attempt.task_id``."""
        record = TaskRecord(self._next_seq, attempt)
        self._next_seq += 1
        self._records[attempt.task_id] = record
        return record

    def remove(self, record: TaskRecord) -> None:
        """Forget the record; a second call does nothing."""
        if self._records.get(record.task_id) is record:
            del self._records[record.task_id]
        if record.expires > 0:
            # Still in the expiry queue: mark it, and drop the marked ones
            # once they are half the queue, so a deleted result's memory is
            # not held until its expiry time.
            record.expires = -1.0
            self._dead += 1
            if self._dead * 2 > len(self._expiring):
                self._expiring = collections.deque(
                    r for r in self._expiring if r.expires > 0
                )
                self._dead = 0

    def retain(self, record: TaskRecord, seconds: float) -> None:
        """Drop the finished ``record`` after ``seconds``, unless removed sooner.

        Every result is kept equally long, so expiries come in the order they
        were set: one queue and one timer serve them all.
        """
        record.expires = time.monotonic() + seconds
        self._expiring.append(record)
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._expiring[0].expires - time.monotonic())
        self._timer = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        while self._expiring and self._expiring[0].expires <= now:
            record = self._expiring.popleft()
            if record.expires < 0:
                self._dead -= 1  # deleted already
                continue
            record.expires = 0.0
            self.remove(record)
        if self._expiring:
            self._arm()

    def close(self) -> None:
        """Forget every record and stop the expiry timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._expiring.clear()
        self._dead = 0
        self._records.clear()

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
