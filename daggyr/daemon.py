"""Daemon mode: ``daggyr -d`` detaches, and returns only once both ports listen.

The foreground process takes the pidfile's lock and opens the log file, so
that those errors reach the terminal, then forks a child that daemonizes with
python-daemon's DaemonContext (double fork, new session, stdio to /dev/null or
the log file) and starts the server there. The daemon reports through a pipe,
one line: ``ready <pid> <rest port> <grpc port>`` once both ports listen,
``config <reason>`` for a configuration mistake, or ``error <reason>``. The
foreground waits for that line and exits 0, 2 or 1 with it (the exit statuses
of ``daggyr`` in the foreground), so ``daggyr -d && next-step`` only proceeds
against a listening runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
import traceback
from typing import TextIO

import daemon

from daggyr.config import Config
from daggyr.server import Server, StartupConfigError, StartupError

__all__ = ["AlreadyRunning", "DaemonError", "PidFile", "daemonize"]

logger = logging.getLogger(__name__)


class DaemonError(Exception):
    """Daemon mode cannot start; the message says why, for a person."""


class AlreadyRunning(DaemonError):
    """The pidfile is locked by a runner that still runs."""


class PidFile:
    """A pidfile locked with flock(2) for as long as its daemon lives.

    The lock, not the pid written in the file, says whether a runner holds
    it: the pid in a file left by a runner killed outright may since belong to
    any process, so such a stale file is taken over. The lock belongs to the
    open file, so it passes to the daemon across fork.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.fd: int | None = None
        self.previous = ""

    def acquire(self) -> None:
        """Lock the file, or DaemonError naming the pid of the runner holding it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise DaemonError(
                    f"cannot open pidfile {self.path}: {exc.strerror}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd) or "unknown (it is still starting)"
                os.close(fd)
                raise AlreadyRunning(
                    f"already running as pid {holder} "
                    f"(pidfile {self.path}): stop it first or use another pidfile"
                ) from None
            # A runner exiting between our open and flock has unlinked the
            # file we opened: locking that one would guard nothing.
            if _same_file(fd, self.path):
                self.fd = fd
                self.previous = _read(fd)
                return
            os.close(fd)

    def write_pid(self) -> None:
        """Record this process's pid in the file."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        """Drop this process's handle; the lock stays with the daemon's copy."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Remove the file and drop the lock; a second call does nothing."""
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.close()


def _read(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip()


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _open_log(path: str | None) -> TextIO | None:
    if path is None:
        return None
    try:
        return open(path, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise DaemonError(f"cannot open log file {path}: {exc.strerror}") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def daemonize(
    config: Config,
    config_path: str | None,
    pidfile: str | None = None,
    log_file: str | None = None,
) -> int:
    """Start a detached runner: 0 once both ports listen, else 2 or 1 and why.

    2 is a configuration mistake (an unusable pidfile or log file included),
    1 a failure at run time (a port taken, the pidfile held by a runner).

    Without ``log_file`` the daemon's logs are discarded (its stderr is
    /dev/null).
    """
    lock = PidFile(pidfile) if pidfile else None
    try:
        if lock is not None:
            lock.acquire()
        log = _open_log(log_file)
    except DaemonError as exc:
        if lock is not None:
            lock.release()
        print(f"daggyr: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, AlreadyRunning) else 2

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        code = 1
        try:
            code = _daemon_main(config, config_path, lock, log, write_end)
        except BaseException:  # the daemon's stderr is the log file, if any
            traceback.print_exc()
        finally:
            logging.shutdown()
            os._exit(code)

    os.close(write_end)
    if lock is not None:
        lock.close()
    if log is not None:
        log.close()
    report = _read_report(read_end)
    os.waitpid(child, 0)
    return _conclude(report, config, log_file)


def _read_report(fd: int) -> str:
    """The daemon's one line; empty when it died before writing one.

    There is no timeout: a daemon that hangs in start-up keeps ``daggyr -d``
    waiting, since giving up would leave behind a daemon that may yet serve.
    """
    chunks = []
    with open(fd, "rb") as pipe:
        while chunk := pipe.read(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


def _conclude(report: str, config: Config, log_file: str | None) -> int:
    kind, _, rest = report.partition(" ")
    if kind == "ready":
        pid, rest_port, grpc_port = rest.split()
        host = f"[{config.ip}]" if ":" in config.ip else config.ip
        print(
            f"daggyr: running as pid {pid}: REST on http://{host}:{rest_port}, "
            f"gRPC on {host}:{grpc_port}"
        )
        return 0
    if kind == "config":
        print(f"daggyr: config error: {rest}", file=sys.stderr)
        return 2
    if kind == "error":
        print(f"daggyr: cannot start: {rest}", file=sys.stderr)
        return 1
    where = f": see {log_file}" if log_file else " (run without -d to see why)"
    print(f"daggyr: the daemon exited before it was ready{where}", file=sys.stderr)
    return 1


def _daemon_main(
    config: Config,
    config_path: str | None,
    lock: PidFile | None,
    log: TextIO | None,
    report_fd: int,
) -> int:
    """Runs in the forked child: detach, then serve until signalled."""
    preserve: list[object] = [report_fd]
    if lock is not None:
        preserve.append(lock.fd)
    if log is not None:
        preserve.append(log)
    context = daemon.DaemonContext(
        # The working directory and umask stay as they were, so relative
        # paths in the config and the files tasks create mean what they do
        # without -d; signal handlers and core limits stay unset, as tasks
        # inherit both.
        working_directory=os.getcwd(),
        umask=_umask(),
        prevent_core=False,
        detach_process=True,
        files_preserve=preserve,
        stderr=log,
        signal_map={},
    )
    context.open()  # from here on this is the daemon: its parents have exited

    from daggyr.cli import setup_logging

    setup_logging(config.log_level, log or sys.stderr)
    try:
        if lock is not None:
            if lock.previous:
                logger.info(
                    "replacing stale pidfile %s (pid %s)", lock.path, lock.previous
                )
            lock.write_pid()
        return asyncio.run(_serve(config, config_path, report_fd))
    finally:
        if lock is not None:
            lock.release()


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (" ".join(line.split()) + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(fd)


async def _serve(config: Config, config_path: str | None, report_fd: int) -> int:
    server = Server(config, config_path)
    try:
        await server.start()  # undoes itself when it fails: nothing to stop
    except StartupConfigError as exc:
        logger.error("config error: %s", exc)
        _report(report_fd, f"config {exc}")
        return 2
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        _report(report_fd, f"error {exc}")
        return 1
    except Exception as exc:
        logger.exception("cannot start")
        _report(report_fd, f"error unexpected {type(exc).__name__}: {exc}")
        return 1
    _report(report_fd, f"ready {os.getpid()} {server.rest_port} {server.grpc_port}")
    await server.serve_until_signalled()
    return 0
