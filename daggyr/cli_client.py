"""The client commands: ``daggyr submit|status|cancel|capacity|list``.

``submit`` runs one task remotely, prints its output and exits with its exit
code (see EXIT_CODES); the others read or stop tasks and show a table, or
JSON with ``--json``. Errors are one line on stderr, never a traceback. When
the reader of stdout goes away (``daggyr list | head``), a command stops
quietly with EXIT_BROKEN_PIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from google.protobuf import json_format, message

from daggyr.client import Client
from daggyr.errors import DaggyrError, NotFound, Unavailable
from daggyr.pool import RunnerPool, RunnerVanished, follow, submit_retrying
from daggyr.v1 import task_pb2

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_CODES", "exit_code_for", "main"]

State = task_pb2.State
DEFAULT_RUNNER = "http://127.0.0.1:2504"

EXIT_ERROR = 1  # status/cancel/list/capacity: the runner refused the request
EXIT_USAGE = 2  # bad arguments, runner unreachable, or the submission refused
EXIT_TIMED_OUT = 201
EXIT_OUT_OF_MEMORY = 202
EXIT_CANCELLED = 203
EXIT_SYSTEM_ERROR = 204
EXIT_RUNNER_VANISHED = 205
# 128 + SIGPIPE: what a shell shows for a program that SIGPIPE ended, which is
# how C tools end when the reader of their output goes away.
EXIT_BROKEN_PIPE = 141
# Codes of their own sit above 192, past 128 + the highest signal number,
# so no ordinary exit code (0-125), shell code (126, 127) or death by
# signal (128 + N) is ever mistaken for them. A task may still exit with
# any of them itself; --json then tells the two apart.
EXIT_CODES = {
    State.TIMED_OUT: EXIT_TIMED_OUT,
    State.OUT_OF_MEMORY: EXIT_OUT_OF_MEMORY,
    State.CANCELLED: EXIT_CANCELLED,
    State.SYSTEM_ERROR: EXIT_SYSTEM_ERROR,
}
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

SUBMIT_EPILOG = f"""\
exit status:
  N        the task's own exit code N (SUCCEEDED or FAILED)
  128+N    the task's main process died of signal N (e.g. 137 for SIGKILL)
  {EXIT_TIMED_OUT}      TIMED_OUT: the task ran past --timeout
  {EXIT_OUT_OF_MEMORY}      OUT_OF_MEMORY: the kernel OOM-killed it at --memory-mb
  {EXIT_CANCELLED}      CANCELLED: someone cancelled it (daggyr cancel, or shutdown)
  {EXIT_SYSTEM_ERROR}      SYSTEM_ERROR: the runner could not start it
  {EXIT_RUNNER_VANISHED}      the runner went away while holding it: outcome unknown
  2        usage error, runner unreachable, or the submission refused
  130/143  interrupted (SIGINT/SIGTERM): the remote task was cancelled
  141      the reader of the output went away (| head): output cut short

example:
  daggyr submit --cores 2 --memory-mb 1024 -- sh -c 'make -j2 test'
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--runner",
        action="append",
        metavar="URL",
        help=f"http(s)://HOST:PORT (REST) or grpc(s)://HOST:PORT; repeat for a "
        f"pool (default {DEFAULT_RUNNER})",
    )
    auth = common.add_mutually_exclusive_group()
    auth.add_argument(
        "--token", help="bearer token (default: $DAGGYR_TOKEN); prefer --token-file"
    )
    auth.add_argument("--token-file", metavar="FILE", help="file holding the token")
    common.add_argument("--ca", metavar="FILE", help="CA bundle for https/grpcs")
    common.add_argument("--json", action="store_true", help="print JSON")

    parser = argparse.ArgumentParser(prog="daggyr", description="daggyr client")
    commands = parser.add_subparsers(dest="verb", required=True)
    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="run one task remotely, print its output, exit with its code",
        usage="daggyr submit [options] -- CMD [ARGS...]",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("--cores", type=float, help="cores to reserve (default 1)")
    submit.add_argument(
        "--memory-mb", type=int, help="memory limit, MiB (default: the runner's)"
    )
    submit.add_argument(
        "--timeout", type=int, default=0, metavar="S", help="seconds (0: none)"
    )
    submit.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="repeatable"
    )
    submit.add_argument("--workdir", default="", help="directory to start in")
    submit.add_argument("--id", help="task id (default: a new unique one)")
    submit.add_argument(
        "-q", "--quiet", action="store_true", help="no state lines on stderr"
    )
    submit.add_argument("command", nargs="*", help=argparse.SUPPRESS)

    for verb, what in (("status", "show a task"), ("cancel", "stop a task")):
        sub = commands.add_parser(verb, parents=[common], help=what)
        sub.add_argument("task_id")
    commands.add_parser("capacity", parents=[common], help="show runners' capacity")
    listing = commands.add_parser("list", parents=[common], help="list tasks")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        type=str.upper,
        choices=[v.name for v in State.DESCRIPTOR.values if v.number],
        help="only tasks in this state; repeatable",
    )
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse, taking everything after the first ``--`` as the command."""
    args = list(argv)
    command: list[str] | None = None
    if args and args[0] == "submit" and "--" in args:
        split = args.index("--")
        args, command = args[:split], args[split + 1 :]
    parser = _parser()
    parsed = parser.parse_args(args)
    if parsed.verb == "submit":
        if command is not None:
            if parsed.command:
                parser.error("give the command either before or after '--', not both")
            parsed.command = command
        if not parsed.command:
            parser.error("submit needs a command: daggyr submit [options] -- CMD ...")
        for pair in parsed.env:
            if "=" not in pair or pair.startswith("="):
                parser.error(f"--env {pair!r} must be KEY=VALUE")
    return parsed


def main(argv: Sequence[str]) -> int:
    """Run one client command; returns the exit status."""
    try:
        code = _run(argv)
        # Flushed here, where a closed pipe can still be handled, and not at
        # interpreter exit, where it would print "Exception ignored".
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """Stop quietly, as a program that SIGPIPE ended would."""
    # Whatever is still buffered would fail again when Python flushes at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str]) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        for url in _urls(args):  # a bad URL, token file or CA file is a usage error
            Client(url, **_client_options(args))
    except DaggyrError as exc:
        _error(str(exc))
        return EXIT_USAGE
    _log_warnings()
    handler = {
        "submit": _submit,
        "status": _status,
        "cancel": _cancel,
        "capacity": _capacity,
        "list": _list,
    }[args.verb]
    try:
        return asyncio.run(handler(args))
    except RunnerVanished as exc:
        _error(str(exc))
        return EXIT_RUNNER_VANISHED
    except DaggyrError as exc:
        _error(str(exc))
        if isinstance(exc, Unavailable) or args.verb == "submit":
            return EXIT_USAGE
        return EXIT_ERROR


def _log_warnings() -> None:
    """Show the library's warnings (a runner skipped) as plain stderr lines."""
    package = logging.getLogger("daggyr")
    if not any(isinstance(h, _WarningLines) for h in package.handlers):
        package.addHandler(_WarningLines())
    package.setLevel(logging.WARNING)


class _WarningLines(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("daggyr: %(message)s"))
        self.setLevel(logging.WARNING)


def _error(text: str) -> None:
    print(f"daggyr: {text}", file=sys.stderr)


def _emit(text: str, stream: TextIO | None = None) -> None:
    """Write all of ``text`` to stdout (or ``stream``), or raise BrokenPipeError.

    Python's buffered writer can report a large write to a pipe whose reader
    left mid-way as a short write instead of an error, which would cut the
    output silently and exit 0; writing until every byte is taken does not.
    """
    stream = stream or sys.stdout
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a text-only stream (a test's capture): nothing to cut
        stream.write(text)
        return
    stream.flush()
    data = memoryview(text.encode(stream.encoding, stream.errors or "strict"))
    while data:
        data = data[buffer.write(data) :]


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    token = args.token
    if token is None and args.token_file is None:
        token = os.environ.get("DAGGYR_TOKEN") or None
    return {"token": token, "token_file": args.token_file, "ca_file": args.ca}


def _urls(args: argparse.Namespace) -> list[str]:
    return list(args.runner or [DEFAULT_RUNNER])


def exit_code_for(attempt: task_pb2.TaskAttempt) -> int:
    """The exit status ``daggyr submit`` reports for a final attempt."""
    if attempt.state in EXIT_CODES:
        return EXIT_CODES[attempt.state]
    if attempt.signal:
        return 128 + int(attempt.signal)
    if attempt.HasField("exit_code"):
        return int(attempt.exit_code) & 0xFF
    return 0 if attempt.state == State.SUCCEEDED else 1


# -- submit ---------------------------------------------------------------------


def _task(args: argparse.Namespace) -> task_pb2.Task:
    task = task_pb2.Task(
        command=args.command,
        environment=dict(pair.split("=", 1) for pair in args.env),
        timeout_seconds=args.timeout,
        working_directory=args.workdir,
    )
    if args.cores is not None:
        task.cores = args.cores
    if args.memory_mb is not None:
        task.memory_mb = args.memory_mb
    return task


class _Progress:
    """The task's state on stderr: a live line on a terminal, else plain lines."""

    def __init__(self, task_id: str, quiet: bool, stream: TextIO) -> None:
        self.task_id = task_id
        self.quiet = quiet
        self.stream = stream
        self.live = stream.isatty() and not quiet
        self.runner = ""
        self.state = ""
        self.since = time.monotonic()
        self._ticker: asyncio.Task[None] | None = None

    def update(self, attempt: task_pb2.TaskAttempt) -> None:
        state = State.Name(attempt.state)
        if state == self.state:
            return
        self.state = state
        if self.live:
            self._draw()
            if self._ticker is None:
                self._ticker = asyncio.ensure_future(self._tick())
        elif not self.quiet and attempt.state in (State.QUEUED, State.RUNNING):
            print(
                f"daggyr: task {self.task_id} {state} on {self.runner}",
                file=self.stream,
            )

    def _draw(self) -> None:
        elapsed = time.monotonic() - self.since
        self.stream.write(
            f"\r\033[Kdaggyr: task {self.task_id} on {self.runner}: "
            f"{self.state} {elapsed:.0f}s"
        )
        self.stream.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._draw()

    def done(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


class _Submission:
    """One ``daggyr submit``: place, follow, and cancel on an interrupt."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.task_id = args.id or f"submit-{uuid.uuid4().hex[:16]}"
        self.urls = _urls(args)
        self.options = _client_options(args)
        self.progress = _Progress(self.task_id, args.quiet, sys.stderr)
        self.pool: RunnerPool | None = None
        self.client: Client | None = None

    async def run(self) -> task_pb2.TaskAttempt:
        task = _task(self.args)
        if len(self.urls) > 1:
            self.pool = RunnerPool(self.urls, **self.options)
            placement = await self.pool.place(self.task_id, task)
            self.client, first = placement.client, placement.attempt
        else:
            self.client = Client(self.urls[0], **self.options)
            first = await submit_retrying(self.client, self.task_id, task, attempts=3)
        self.progress.runner = self.client.url
        self.progress.update(first)
        return await follow(self.client, self.task_id, on_change=self.progress.update)

    async def cancel_remote(self) -> None:
        """Cancel the task wherever it may have been submitted."""
        if self.client is not None:
            clients = [self.client]
        elif self.pool is not None:
            clients = list(self.pool.clients.values())
        else:
            return
        for client in clients:
            with contextlib.suppress(DaggyrError, TimeoutError):
                async with asyncio.timeout(10):
                    await client.cancel(self.task_id)
                    return

    async def close(self) -> None:
        self.progress.done()
        if self.pool is not None:
            await self.pool.close()
        if self.client is not None:
            await self.client.close()


async def _submit(args: argparse.Namespace) -> int:
    submission = _Submission(args)
    loop = asyncio.get_running_loop()
    work = asyncio.ensure_future(submission.run())
    received: list[int] = []

    def interrupt(signum: int) -> None:
        received.append(signum)
        work.cancel()

    for signum in _SIGNAL_EXIT:
        loop.add_signal_handler(signum, interrupt, signum)
    try:
        try:
            final = await work
        except asyncio.CancelledError:
            if not received:
                raise
            submission.progress.done()
            _error(f"interrupted: cancelling task {submission.task_id}")
            await submission.cancel_remote()
            return _SIGNAL_EXIT[signal.Signals(received[0])]
    finally:
        for signum in _SIGNAL_EXIT:
            loop.remove_signal_handler(signum)
        await submission.close()

    if args.json:
        _emit(_json(final) + "\n")
    else:
        _emit(final.output_log)
        sys.stdout.flush()
        _emit(final.error_log, sys.stderr)
        if final.state != State.SUCCEEDED and not args.quiet:
            _error(f"task {submission.task_id} {_outcome(final)}")
    return exit_code_for(final)


def _outcome(attempt: task_pb2.TaskAttempt) -> str:
    text: str = State.Name(attempt.state)
    if attempt.signal:
        text += f" (signal {attempt.signal})"
    elif attempt.HasField("exit_code"):
        text += f" (exit code {attempt.exit_code})"
    if attempt.state == State.SYSTEM_ERROR and attempt.executor_log:
        text += ": " + attempt.executor_log.strip().splitlines()[-1]
    return text


# -- status, cancel, capacity, list ----------------------------------------------


def _json(value: message.Message) -> str:
    return json.dumps(_dict(value), indent=2)


def _dict(value: message.Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        value,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


async def _on_first_holding(
    args: argparse.Namespace,
    act: Callable[[Client], Any],
) -> tuple[str, task_pb2.TaskAttempt]:
    """``act`` on the first runner that holds the task; NotFound if none does."""
    missing: NotFound | None = None
    for url in _urls(args):
        async with Client(url, **_client_options(args)) as client:
            try:
                return url, await act(client)
            except NotFound as exc:
                missing = exc
    assert missing is not None
    raise missing


def _show_attempt(url: str, attempt: task_pb2.TaskAttempt, as_json: bool) -> None:
    if as_json:
        _emit(_json(attempt) + "\n")
        return
    rows = [
        ("task_id", attempt.task_id),
        ("runner", url),
        ("state", State.Name(attempt.state)),
        ("exit_code", str(attempt.exit_code) if attempt.HasField("exit_code") else "-"),
        ("signal", str(attempt.signal or "-")),
        ("command", " ".join(attempt.task.command)),
        ("cores", f"{attempt.task.cores:g}"),
        ("memory_mb", str(attempt.task.memory_mb)),
        ("submitted", _time(attempt, "submit_time")),
        ("started", _time(attempt, "start_time")),
        ("stopped", _time(attempt, "stop_time")),
        ("duration", _duration(attempt)),
        ("peak_memory_mb", f"{attempt.peak_memory_mb:.1f}"),
        ("cpu_seconds", f"{attempt.cpu_seconds:.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}\n" for name, value in rows]
    for title, text in (("stdout", attempt.output_log), ("stderr", attempt.error_log)):
        if text:
            lines.append(
                f"--- {title} ---\n{text}" + ("" if text.endswith("\n") else "\n")
            )
    _emit("".join(lines))


def _time(attempt: task_pb2.TaskAttempt, field: str) -> str:
    if not attempt.HasField(field):
        return "-"
    seconds = getattr(attempt, field).ToNanoseconds() / 1e9
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _duration(attempt: task_pb2.TaskAttempt) -> str:
    if not attempt.HasField("start_time"):
        return "-"
    start = attempt.start_time.ToNanoseconds()
    stop = (
        attempt.stop_time.ToNanoseconds()
        if attempt.HasField("stop_time")
        else time.time_ns()
    )
    return f"{(stop - start) / 1e9:.2f}s"


async def _status(args: argparse.Namespace) -> int:
    url, attempt = await _on_first_holding(args, lambda c: c.get(args.task_id))
    _show_attempt(url, attempt, args.json)
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    url, attempt = await _on_first_holding(args, lambda c: c.cancel(args.task_id))
    _show_attempt(url, attempt, args.json)
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
        for r in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


async def _capacity(args: argparse.Namespace) -> int:
    urls = _urls(args)
    async with RunnerPool(urls, **_client_options(args)) as pool:
        survey = await pool.survey()
    # Runners that did not answer have been named on stderr by the pool.
    if args.json:
        found = [{"runner": u, **_dict(r)} for u, r in survey.reports.items()]
        if len(urls) == 1 and found:
            found[0].pop("runner")
            _emit(json.dumps(found[0], indent=2) + "\n")
        elif found or not survey.unreachable:
            _emit(json.dumps(found, indent=2) + "\n")
    elif survey.reports:
        header = (
            "RUNNER",
            "CORES FREE/TOTAL",
            "MEMORY_MB FREE/TOTAL",
            "RUNNING",
            "QUEUED",
            "ENFORCEMENT",
        )
        rows = [
            (
                url,
                f"{r.free.cores:g}/{r.total.cores:g}",
                f"{r.free.memory_mb}/{r.total.memory_mb}",
                str(r.running_tasks),
                str(r.queued_tasks),
                r.enforcement
                + (f" ({r.enforcement_reason})" if r.enforcement_reason else ""),
            )
            for url, r in survey.reports.items()
        ]
        _emit(_table(header, rows) + "\n")
    return EXIT_USAGE if survey.unreachable else 0


async def _list(args: argparse.Namespace) -> int:
    states = [State.Value(name) for name in args.state]
    urls = _urls(args)
    found: list[tuple[str, task_pb2.TaskAttempt]] = []
    for url in urls:
        async with Client(url, **_client_options(args)) as client:
            found += [(url, a) async for a in client.iter_tasks(states)]
    if args.json:
        items = [_dict(a) | ({"runner": u} if len(urls) > 1 else {}) for u, a in found]
        _emit(json.dumps(items, indent=2) + "\n")
        return 0
    header = ["TASK_ID", "STATE", "EXIT", "CORES", "MEMORY_MB", "DURATION", "COMMAND"]
    rows = []
    for url, a in found:
        exit_text = (
            str(a.exit_code)
            if a.HasField("exit_code")
            else (f"sig {a.signal}" if a.signal else "-")
        )
        row = [
            a.task_id,
            State.Name(a.state),
            exit_text,
            f"{a.task.cores:g}",
            str(a.task.memory_mb),
            _duration(a),
            " ".join(a.task.command),
        ]
        rows.append([*row, url] if len(urls) > 1 else row)
    _emit(_table([*header, "RUNNER"] if len(urls) > 1 else header, rows) + "\n")
    return 0
