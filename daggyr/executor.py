"""Runs one task's process in its cgroup and reports how it ended.

daggyr.spawn starts the process inside its cgroup; this module supervises it:
output capture under the cap, the timeout, cancel with its grace, the end of
the task when its main process exits, and the accounting read afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daggyr.cgroups import AppliedLimits, CgroupError, CgroupManager, TaskCgroup, Usage
from daggyr.environment import StartError, base_environment, check_start
from daggyr.output import CappedOutput
from daggyr.spawn import Child, SpawnError, TaskUser, launch_error, one_step, spawn
from daggyr.v1 import task_pb2

__all__ = ["Executor", "Outcome", "TaskUser"]

logger = logging.getLogger(__name__)

State = task_pb2.State

_READ_SIZE = 1 << 20
_PIPE_SIZE = 1 << 20
# How long buffered output may take to arrive once every writer is dead.
_DRAIN_SECONDS = 0.5


@dataclass
class Outcome:
    """How one task ended, with everything measured about it."""

    state: int
    start_time: float
    stop_time: float
    exit_code: int | None = None
    signal: int = 0
    output: str = ""
    error: str = ""
    truncated: bool = False
    log: list[str] = field(default_factory=list)
    usage: Usage | None = None
    limits: AppliedLimits | None = None


class Executor:
    """Starts tasks' processes; one per runner, shared by every task."""

    def __init__(
        self,
        cgroups: CgroupManager,
        temp_root: Path,
        max_output_bytes: int,
        kill_grace_seconds: float,
        max_task_pids: int,
        task_user: TaskUser | None = None,
    ) -> None:
        self.cgroups = cgroups
        self.temp_root = temp_root
        self.max_output_bytes = max_output_bytes
        self.kill_grace_seconds = kill_grace_seconds
        self.max_task_pids = max_task_pids
        self.task_user = task_user
        if not one_step() and not shutil.which("setpriv"):
            logger.warning(
                "setpriv not found: tasks will not die with the runner "
                "(no parent-death signal) and task_user cannot be applied"
            )

    def execution(self, task_id: str, name: str, task: task_pb2.Task) -> Execution:
        """A not yet started run of ``task``; ``name`` is its on-disk name."""
        return Execution(self, task_id, name, task)


class Execution:
    """One run of one task: spawn, supervise, stop, collect."""

    def __init__(
        self,
        executor: Executor,
        task_id: str,
        name: str,
        task: task_pb2.Task,
    ) -> None:
        self._ex = executor
        self.task_id = task_id
        self.name = name
        self.task = task
        self.log: list[str] = []
        self.pid: int | None = None
        self._stop_state: int | None = None
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()
        self._cgroup: TaskCgroup | None = None
        self._temp_dir: Path | None = None
        self._proc: Child | None = None
        self._out = self._err = CappedOutput(0)
        self._start_time = 0.0

    def stop(self, state: int, reason: str) -> None:
        """Ask the run to end as ``state``; a second call only shortens the grace."""
        if self._stop_state is not None:
            self._hurry.set()
            return
        self._stop_state = state
        self.log.append(reason)
        self._stop_requested.set()

    @property
    def start_time(self) -> float:
        """When the start was attempted (seconds since the epoch)."""
        return self._start_time

    def start(self) -> bool:
        """Spawn the process now; False when it could not start (see wait())."""
        self._start_time = time.time()
        try:
            self._proc, self._out, self._err = self._start()
        except StartError as exc:
            self.log.append(str(exc))
            return False
        except OSError as exc:  # the temporary directory, or the host itself
            self.log.append(f"could not prepare the task: {exc}")
            return False
        return True

    async def wait(self) -> Outcome:
        """Supervise the run to its end; never raises for anything the task does.

        Every process of the task is gone when this returns; its cgroup and
        temporary directory are left for cleanup(), so that removing them is
        not on the path from the task's end to its result.
        """
        if self._proc is None:
            return Outcome(
                State.SYSTEM_ERROR, self._start_time, time.time(), log=self.log
            )
        return await self._supervise(self._proc, self._out, self._err, self._start_time)

    def _start(self) -> tuple[Child, CappedOutput, CappedOutput]:
        ex, task = self._ex, self.task
        user = ex.task_user
        self._temp_dir = ex.temp_root / self.name
        self._temp_dir.mkdir(mode=0o700)
        if user:
            os.chown(self._temp_dir, user.uid, user.gid)
        env = base_environment(task.environment, str(self._temp_dir))
        cwd = task.working_directory or str(self._temp_dir)
        uid = user.uid if user else os.getuid()
        gids = {user.gid} if user else set(os.getgroups()) | {os.getgid()}
        program = check_start(task.command[0], cwd, env, uid, gids)

        self.log.append(f"enforcement: {ex.cgroups.mode}" + _reason(ex.cgroups))
        try:
            self._cgroup = ex.cgroups.create(
                self.name, task.cores, task.memory_mb, ex.max_task_pids
            )
        except CgroupError as exc:
            raise StartError(f"cgroup setup failed: {exc}") from None
        procs: tuple[str, ...] = ()
        if self._cgroup is not None:
            self.log.append(f"cgroup {self._cgroup.path}")
            self.log.extend(self._cgroup.notes)
            procs = self._cgroup.procs_files
        try:
            child = spawn(program, task.command, env, cwd, procs, user)
        except SpawnError as exc:
            raise StartError(str(exc)) from None
        self.pid = child.pid
        self.log.append(f"started pid {child.pid} in {cwd}")
        out = CappedOutput(ex.max_output_bytes)
        err = CappedOutput(ex.max_output_bytes)
        return child, out, err

    async def _supervise(
        self,
        proc: Child,
        out: CappedOutput,
        err: CappedOutput,
        start: float,
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        readers = [
            _PipeReader(loop, proc.stdout, out),
            _PipeReader(loop, proc.stderr, err),
        ]
        exited = _ProcessExit(loop, proc.pid)
        timer = None
        if self.task.timeout_seconds:
            timer = loop.call_later(
                self.task.timeout_seconds,
                self.stop,
                State.TIMED_OUT,
                f"timeout of {self.task.timeout_seconds} s reached",
            )
        sampler = None
        if self._cgroup is not None and self._cgroup.needs_sampling:
            sampler = asyncio.ensure_future(_sample(self._cgroup))
        try:
            stop_wait = asyncio.ensure_future(self._stop_requested.wait())
            either: list[asyncio.Future[Any]] = [exited.future, stop_wait]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if not exited.future.done():
                await self._terminate(exited.future)
            await exited.future
            returncode = proc.wait()
            self.log.append(_describe_exit(returncode))
            await self._kill_leftovers(proc.pid)
            await _drain(readers)
        finally:
            if timer:
                timer.cancel()
            if sampler:
                sampler.cancel()
            exited.close()
            for reader in readers:
                reader.close()
        return self._outcome(returncode, out, err, start)

    async def _terminate(self, exited: asyncio.Future[None]) -> None:
        """SIGTERM everything, then SIGKILL what is left after the grace."""
        grace = self._ex.kill_grace_seconds
        sent = self._signal(signal.SIGTERM)
        self.log.append(f"sent SIGTERM to {sent} process(es)")
        if await self._wait_gone(exited, grace):
            return
        sent = self._signal(signal.SIGKILL)
        self.log.append(
            f"processes still alive after the {grace:g} s grace: "
            f"sent SIGKILL to {sent} process(es)"
        )

    async def _wait_gone(self, exited: asyncio.Future[None], grace: float) -> bool:
        """Wait up to ``grace`` for the main process and its cgroup to end."""
        gone = asyncio.ensure_future(self._all_gone(exited, grace))
        hurry = asyncio.ensure_future(self._hurry.wait())
        done, _ = await asyncio.wait(
            [gone, hurry], timeout=grace, return_when=asyncio.FIRST_COMPLETED
        )
        gone.cancel()
        hurry.cancel()
        return gone in done and gone.result()

    async def _all_gone(self, exited: asyncio.Future[None], grace: float) -> bool:
        await asyncio.shield(exited)
        if self._cgroup is None:
            return True
        return await self._cgroup.wait_empty(grace)

    def _signal(self, sig: int) -> int:
        """Signal every process of the task; returns how many were signalled.

        The process group is signalled as well as the cgroup: a child that has
        not yet joined its cgroup (still in the trampoline) is only there.
        """
        sent = 0
        if self._cgroup is not None:
            sent = self._cgroup.signal_all(sig)
        assert self.pid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
            sent = max(sent, 1)
        return sent

    async def _kill_leftovers(self, pid: int) -> None:
        """The task ended with its main process: nothing else of it may run on."""
        if self._cgroup is not None:
            if self._cgroup.is_empty():
                return
            sent = self._cgroup.signal_all(signal.SIGKILL)
            if sent:
                self.log.append(
                    f"killed {sent} leftover process(es) after the main process ended"
                )
            if not await self._cgroup.wait_empty(5.0):
                self.log.append("processes survived SIGKILL in the cgroup")
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def _outcome(
        self, returncode: int, out: CappedOutput, err: CappedOutput, start: float
    ) -> Outcome:
        usage = limits = None
        if self._cgroup is not None:
            try:
                usage = self._cgroup.usage()
                limits = self._cgroup.limits()
                self.log.extend(usage.notes)
            except CgroupError as exc:
                self.log.append(f"could not read cgroup accounting: {exc}")
        error_text = err.text()
        outcome = Outcome(
            state=State.FAILED,
            start_time=start,
            stop_time=start,
            output=out.text(),
            error=error_text,
            truncated=out.truncated or err.truncated,
            log=self.log,
            usage=usage,
            limits=limits,
        )
        if returncode < 0:
            outcome.signal = -returncode
        else:
            outcome.exit_code = returncode
        oom = usage.oom_kills if usage else 0

        failed_launch = launch_error(returncode, error_text)
        if self._stop_state is not None:
            outcome.state = self._stop_state
        elif failed_launch:
            outcome.state = State.SYSTEM_ERROR
            outcome.exit_code = None
            outcome.error = ""
            self.log.append(failed_launch)
        elif returncode == 0:
            outcome.state = State.SUCCEEDED
        elif oom:
            outcome.state = State.OUT_OF_MEMORY
        if oom:
            self.log.append(
                f"the kernel OOM-killed {oom} process(es) at the task's memory "
                f"limit of {self.task.memory_mb} MiB"
            )
        outcome.stop_time = time.time()
        return outcome

    async def cleanup(self) -> None:
        """Remove the task's cgroup and temporary directory; safe to repeat.

        Runs in a worker thread: nothing of the task runs any more, and the
        event loop goes on serving meanwhile.
        """
        cgroup, self._cgroup = self._cgroup, None
        temp_dir, self._temp_dir = self._temp_dir, None
        if cgroup is not None or temp_dir is not None:
            await asyncio.to_thread(self._remove, cgroup, temp_dir)

    def _remove(self, cgroup: TaskCgroup | None, temp_dir: Path | None) -> None:
        if cgroup is not None:
            try:
                cgroup.remove_now()
            except CgroupError as exc:
                logger.warning(
                    "task %s: could not remove cgroup: %s", self.task_id, exc
                )
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _reason(cgroups: CgroupManager) -> str:
    return f" ({cgroups.reason})" if cgroups.reason else ""


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"main process killed by signal {name}"
    return f"main process exited with code {returncode}"


async def _sample(cgroup: TaskCgroup) -> None:
    while True:
        try:
            cgroup.sample()
        except CgroupError:
            return
        await asyncio.sleep(0.1)


async def _drain(readers: list[_PipeReader]) -> None:
    """Wait briefly for EOF; what is buffered by then is kept, the rest dropped.

    Every writer is dead by now unless the runner has no cgroups and a
    descendant escaped the process group: it cannot hold the task open.
    """
    await asyncio.wait([r.eof for r in readers], timeout=_DRAIN_SECONDS)
    for reader in readers:
        reader.read_available()


class _PipeReader:
    """Reads one pipe in chunks as the loop reports it readable."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, sink: CappedOutput
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._sink = sink
        self.eof: asyncio.Future[None] = loop.create_future()
        os.set_blocking(self._fd, False)
        # A bigger pipe means fewer wake-ups when a task floods its output.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """Take one chunk; False once nothing more is there now (or ever)."""
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if data:
            self._sink.feed(data)
            return True
        self._loop.remove_reader(self._fd)
        if not self.eof.done():
            self.eof.set_result(None)
        return False

    def read_available(self) -> None:
        """Take whatever is buffered in the pipe now, without waiting for more."""
        while not self.eof.done() and self._read_once():
            pass

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class _ProcessExit:
    """Resolves when a child exits, via its pidfd (no thread, no SIGCHLD)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        self._loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self._fd = os.pidfd_open(pid)
        loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._fd)
        if not self.future.done():
            self.future.set_result(None)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
