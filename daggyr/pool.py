"""Runner selection the way daggyd does it, and running a task to its end.

The rule (``choose``): among runners whose free capacity covers the task, the
one with the lowest impact, where impact is the largest over all resources of
requirement / free. Ties go to the runner with the most free cores, then the
most free memory, then the one listed first. Impacts are compared as exact
fractions of the reported figures, so equal ratios tie exactly.

A task that leaves ``cores`` or ``memory_mb`` unset is placed as if it asked
for 1 core and ``default_memory_mb`` (the runner's default, 512), and is
submitted with those figures set, so the choice and the reservation agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from daggyr.client import Client, OnChange
from daggyr.errors import (
    DaggyrError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from daggyr.v1 import task_pb2

__all__ = [
    "NoRunnerFits",
    "Placement",
    "RunnerPool",
    "RunnerVanished",
    "Survey",
    "choose",
    "follow",
    "impact",
    "submit_retrying",
    "task_needs",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_MB = 512
_RESOURCES = (("cores", "cores"), ("memory_mb", "MiB"))


class NoRunnerFits(FailedPrecondition):
    """No runner has the free capacity the task needs.

    ``runner`` is the one closest to fitting, ``resource`` what it lacks most
    (``cores`` or ``memory_mb``) and ``shortfall`` by how much.
    """

    def __init__(
        self, message: str, runner: str = "", resource: str = "", shortfall: float = 0
    ) -> None:
        super().__init__(message)
        self.runner = runner
        self.resource = resource
        self.shortfall = shortfall


class RunnerVanished(Unavailable):
    """The runner holding a task went away before the task ended.

    The task's outcome is unknown: it is not a task failure, and the task may
    be submitted again elsewhere.
    """

    def __init__(self, runner_url: str, task_id: str, why: str = "") -> None:
        super().__init__(
            f"runner {runner_url} vanished while holding task {task_id!r}"
            + (f" ({why})" if why else "")
            + ": its outcome is unknown"
        )
        self.runner_url = runner_url
        self.task_id = task_id


def task_needs(
    task: task_pb2.Task, default_memory_mb: int = DEFAULT_MEMORY_MB
) -> task_pb2.Capacity:
    """What ``task`` reserves, with the runner's defaults for unset figures."""
    return task_pb2.Capacity(
        cores=task.cores if task.HasField("cores") else 1.0,
        memory_mb=task.memory_mb if task.HasField("memory_mb") else default_memory_mb,
    )


def _fits(needs: task_pb2.Capacity, free: task_pb2.Capacity) -> bool:
    return bool(needs.cores <= free.cores and needs.memory_mb <= free.memory_mb)


def impact(needs: task_pb2.Capacity, free: task_pb2.Capacity) -> Fraction:
    """The largest, over cores and memory, of requirement / free (fits only)."""
    return max(
        Fraction(getattr(needs, name)) / Fraction(getattr(free, name))
        for name, _ in _RESOURCES
    )


def choose(
    needs: task_pb2.Capacity,
    capacities: Sequence[task_pb2.Capacity],
    names: Sequence[str] = (),
) -> int:
    """The index of the free capacity in ``capacities`` the task should go to.

    Lowest impact wins; ties go to the most free cores, then the most free
    memory, then the lowest index. NoRunnerFits, naming the resource and the
    shortfall of the runner closest to fitting (``names`` label them), when
    none fits.
    """
    fitting = [i for i, free in enumerate(capacities) if _fits(needs, free)]
    if fitting:
        return min(
            fitting,
            key=lambda i: (
                impact(needs, capacities[i]),
                -capacities[i].cores,
                -capacities[i].memory_mb,
                i,
            ),
        )
    raise _no_fit(needs, capacities, names)


def _no_fit(
    needs: task_pb2.Capacity,
    capacities: Sequence[task_pb2.Capacity],
    names: Sequence[str],
) -> NoRunnerFits:
    wanted = f"{needs.cores:g} cores and {needs.memory_mb} MiB"
    if not capacities:
        return NoRunnerFits(f"no runner to place a task needing {wanted}")

    def gap(i: int) -> tuple[Fraction, str, float]:
        """The largest relative shortfall of runner i, its resource and amount."""
        worst = (Fraction(0), "", 0.0)
        for name, _ in _RESOURCES:
            short = getattr(needs, name) - getattr(capacities[i], name)
            if short > 0:
                worst = max(
                    worst,
                    (Fraction(short) / Fraction(getattr(needs, name)), name, short),
                )
        return worst

    closest = min(range(len(capacities)), key=lambda i: (gap(i)[0], i))
    _, resource, short = gap(closest)
    label = names[closest] if closest < len(names) else f"runner {closest + 1}"
    free = capacities[closest]
    unit = dict(_RESOURCES)[resource]
    return NoRunnerFits(
        f"no runner has {wanted} free: the closest, {label}, is {short:g} {unit} "
        f"short of {resource} (free: {free.cores:g} cores, {free.memory_mb} MiB); "
        "retry when tasks finish",
        runner=label,
        resource=resource,
        shortfall=short,
    )


@dataclass(frozen=True)
class Survey:
    """What each reachable runner reported, and why the others were skipped."""

    reports: dict[str, task_pb2.CapacityReport]
    unreachable: dict[str, str]


@dataclass(frozen=True)
class Placement:
    """A task submitted to the runner the rule chose."""

    task_id: str
    runner: str
    client: Client
    attempt: task_pb2.TaskAttempt
    needs: task_pb2.Capacity
    survey: Survey


async def submit_retrying(
    client: Client,
    task_id: str,
    task: task_pb2.Task,
    attempts: int = 5,
    delay: float = 0.2,
) -> task_pb2.TaskAttempt:
    """Submit, retrying a submission lost in transit under the same task_id.

    Safe because submission is idempotent: a retry of a submission that did
    arrive returns the attempt already held. Unavailable and
    DeadlineExceeded are retried (with doubling delays); other errors are not.
    """
    for number in range(1, attempts + 1):
        try:
            return await client.submit(task_id, task)
        except (Unavailable, DeadlineExceeded) as exc:
            if number == attempts:
                raise
            logger.info(
                "submitting %s to %s failed (%s): retry %d of %d",
                task_id,
                client.url,
                exc,
                number,
                attempts - 1,
                extra={"task_id": task_id, "runner": client.url},
            )
            await asyncio.sleep(delay * 2 ** (number - 1))
    raise AssertionError("unreachable")


async def follow(
    client: Client,
    task_id: str,
    timeout: float | None = None,
    on_change: OnChange | None = None,
    grace: float = 3.0,
) -> task_pb2.TaskAttempt:
    """The task's final attempt; RunnerVanished if its runner goes away.

    A wait broken in transit is resumed when the runner answers again within
    ``grace`` seconds and still holds the task; otherwise the runner has
    vanished (killed, or restarted and so forgot the task). Past ``timeout``
    seconds this raises DeadlineExceeded and leaves the task running.
    """
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            while True:
                try:
                    return await client.wait(task_id, on_change=on_change)
                except NotFound as exc:
                    raise RunnerVanished(client.url, task_id, "task forgotten") from exc
                except (Unavailable, DeadlineExceeded) as exc:
                    if not await _still_holds(client, task_id, grace):
                        raise RunnerVanished(client.url, task_id, str(exc)) from exc
    except TimeoutError:
        if deadline.expired():
            raise DeadlineExceeded(
                f"task {task_id!r} did not finish within {timeout:g} s"
            ) from None
        raise


async def _still_holds(client: Client, task_id: str, grace: float) -> bool:
    """Whether the runner answers within ``grace`` seconds and holds the task."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + grace
    pause = 0.1
    while True:
        try:
            await client.get(task_id)
            return True
        except NotFound:
            return False
        except (Unavailable, DeadlineExceeded):
            if loop.time() + pause > give_up:
                return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


class RunnerPool:
    """Several runners; each task goes to the one ``choose`` names.

    Each placement asks every runner for its capacity afresh, concurrently,
    with ``survey_timeout``; runners that do not answer are skipped (and
    named in the Survey and the log). Placements running concurrently see
    the same free capacity and may pick the same runner; the runner then
    queues what no longer fits, so nothing is lost, but the choice is only
    as good as the last survey.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        survey_timeout: float = 5.0,
        default_memory_mb: int = DEFAULT_MEMORY_MB,
        submit_attempts: int = 5,
        **client_options: Any,
    ) -> None:
        if not urls:
            raise ValueError("a RunnerPool needs at least one runner URL")
        self.clients = {url: Client(url, **client_options) for url in urls}
        self.survey_timeout = survey_timeout
        self.default_memory_mb = default_memory_mb
        self.submit_attempts = submit_attempts

    async def __aenter__(self) -> RunnerPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every runner's connection."""
        await asyncio.gather(*(client.close() for client in self.clients.values()))

    async def survey(self) -> Survey:
        """Every runner's capacity report, asked concurrently."""

        async def ask(client: Client) -> task_pb2.CapacityReport:
            async with asyncio.timeout(self.survey_timeout):
                return await client.capacity()

        urls = list(self.clients)
        answers = await asyncio.gather(
            *(ask(self.clients[url]) for url in urls), return_exceptions=True
        )
        reports, unreachable = {}, {}
        for url, answer in zip(urls, answers, strict=True):
            if isinstance(answer, TimeoutError | DaggyrError):
                why = str(answer) or f"no answer within {self.survey_timeout:g} s"
                unreachable[url] = why
                logger.warning("runner %s skipped: %s", url, why, extra={"runner": url})
            elif isinstance(answer, BaseException):
                raise answer
            else:
                reports[url] = answer
        return Survey(reports, unreachable)

    async def place(self, task_id: str, task: task_pb2.Task) -> Placement:
        """Choose a runner for the task by the rule and submit it there."""
        needs = task_needs(task, self.default_memory_mb)
        survey = await self.survey()
        if not survey.reports:
            reasons = "; ".join(f"{u}: {why}" for u, why in survey.unreachable.items())
            raise Unavailable(f"no runner answered: {reasons}")
        urls = list(survey.reports)
        index = choose(needs, [r.free for r in survey.reports.values()], urls)
        url = urls[index]

        sent = task_pb2.Task()
        sent.CopyFrom(task)
        sent.cores, sent.memory_mb = needs.cores, needs.memory_mb
        client = self.clients[url]
        attempt = await submit_retrying(client, task_id, sent, self.submit_attempts)
        logger.debug("task %s placed on %s", task_id, url, extra={"runner": url})
        return Placement(task_id, url, client, attempt, needs, survey)

    async def run(
        self,
        task_id: str,
        task: task_pb2.Task,
        *,
        timeout: float | None = None,
        on_change: OnChange | None = None,
    ) -> task_pb2.TaskAttempt:
        """Place the task, follow it to its end and return its final attempt.

        RunnerVanished (never a task state) when its runner goes away first.
        """
        placement = await self.place(task_id, task)
        if on_change is not None:
            on_change(placement.attempt)
        return await follow(placement.client, task_id, timeout, on_change)
