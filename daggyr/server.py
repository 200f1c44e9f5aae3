"""One asyncio process serving both protocols over one servicer and one table.

``Server.start`` checks the config (daggyr.preflight), then binds both ports
(port 0 picks a free one; the bound port is read back into ``rest_port`` and
``grpc_port``). ``Server.stop`` is graceful: it refuses new tasks, cancels
every task with its grace, removes the cgroups, then closes both servers; a
second call while the first runs cuts the grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2

from daggyr.auth import TokenCheck, bearer_interceptor, bearer_middleware
from daggyr.capacity import detect_capacity
from daggyr.cgroups import CgroupError
from daggyr.config import Config
from daggyr.executor import Executor
from daggyr.grpc_server import add_services
from daggyr.metrics import Metrics
from daggyr.preflight import Preflight, StartupConfigError, StartupError, preflight
from daggyr.rest import build_app
from daggyr.rpcs import SERVICE
from daggyr.runner import Runner
from daggyr.servicer import RunnerServicer

__all__ = ["Server", "StartupConfigError", "StartupError"]

logger = logging.getLogger(__name__)

# Loops whose default executor a Server has sized (config web-threads). Only
# the first Server on a loop sets it, so no pool is ever orphaned; the loop
# shuts it down when it closes.
_SIZED_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

# Once every task has ended, every watch and long-poll on either protocol has
# its final answer and needs only to send it; whatever is still open after
# this is open for good (a gRPC health Watch, a reflection stream, a client
# stalled mid-request) and is cut, so that it cannot hold the exit up.
_CLOSE_GRACE_SECONDS = 0.5


_TASK_DIR = re.compile(r"[0-9]+-")


def _clean_temp_root(root: Path) -> None:
    """Remove a previous run's task directories from the temp root."""
    # Only names this runner makes (<n>-<id>) are removed, so a temp_root
    # shared with anything else (even /tmp itself) loses nothing of theirs.
    for leftover in root.iterdir():
        ours = _TASK_DIR.match(leftover.name) and not leftover.is_symlink()
        if ours and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _listen(host: str, port: int, what: str) -> socket.socket:
    try:
        # The family of the address itself, so that ::1 binds as well as 127.0.0.1.
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        # create_server appends the address to strerror; ours already names it.
        errno = exc.errno or 0
        why = os.strerror(errno) if errno > 0 else exc.strerror or str(exc)
        raise StartupError(
            f"cannot listen on {_grpc_address(host, port)} for {what}: {why}"
        ) from None


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """A runner: the core, the gRPC server and the REST server."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.rest_port = 0
        self.grpc_port = 0
        self.serving = False
        self._started = False
        self._stopping: asyncio.Task[None] | None = None
        self._web: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.runner: Runner | None = None
        self.metrics: Metrics | None = None
        # The bearer tokens accepted, when auth is on; reload() re-reads them.
        self.tokens: TokenCheck | None = None
        self._background: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        """Check the config, then bind both ports and serve.

        A config that cannot work raises StartupConfigError before anything is
        bound; a later failure (a port taken, cgroup set-up) raises
        StartupError once what was set up is undone. Either way nothing is
        left to stop().
        """
        checked = preflight(self.config)
        loop = asyncio.get_running_loop()
        if loop not in _SIZED_LOOPS:
            # Blocking work (cgroup and temp clean-up, DNS) runs in this pool;
            # both servers handle requests on the event loop itself.
            pool = ThreadPoolExecutor(
                self.config.web_threads, thread_name_prefix="daggyr"
            )
            loop.set_default_executor(pool)
            _SIZED_LOOPS.add(loop)
        self.tokens = checked.tokens
        notes = await self._bind(checked)
        self._started = self.serving = True
        self._log_started(checked, notes)

    async def _bind(self, checked: Preflight) -> list[str]:
        """Set up the cgroups, the core and both servers; undone if any step fails."""
        rest_socket: socket.socket | None = None
        try:
            try:
                checked.cgroups.setup()  # logs each leftover cgroup it cleans
            except CgroupError as exc:
                raise StartupError(f"cgroup set-up failed: {exc}") from None
            notes = self._make_runner(checked)
            rest_socket = _listen(self.config.ip, self.config.port, "REST")
            if self.config.grpc_port:
                # grpc's own refusal is vaguer and adds a C-level log line;
                # a port taken in between still fails, in grpc's words.
                _listen(self.config.ip, self.config.grpc_port, "gRPC").close()
            await self._serve_on(checked, rest_socket)
        except BaseException:
            await self._undo(checked, rest_socket)
            raise
        return notes

    def _make_runner(self, checked: Preflight) -> list[str]:
        """The core over the checked settings; returns the capacity notes."""
        config = self.config
        total, notes = detect_capacity(
            config.capacity_overrides.cores,
            config.capacity_overrides.memory_mb,
            checked.cgroups.own_limits(),
        )
        _clean_temp_root(checked.temp_root)
        executor = Executor(
            checked.cgroups,
            checked.temp_root,
            config.max_output_bytes,
            config.kill_grace_seconds,
            config.max_task_pids,
            checked.task_user,
        )
        self.runner = Runner(
            executor,
            total,
            default_memory_mb=config.default_memory_mb,
            max_queued_tasks=config.max_queued_tasks,
            max_backfill_overtakes=config.max_backfill_overtakes,
            result_ttl_seconds=config.result_ttl_seconds,
        )
        self.metrics = Metrics(self.runner)
        return notes

    async def _serve_on(self, checked: Preflight, rest_socket: socket.socket) -> None:
        """Start gRPC on its port and REST on ``rest_socket``."""
        config, metrics = self.config, self.metrics
        assert self.runner is not None and metrics is not None
        servicer = RunnerServicer(self.runner)
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
            interceptors=[bearer_interceptor(self.tokens)] if self.tokens else None,
        )
        self._health = add_services(
            self._grpc, servicer, observe=metrics.observer("grpc")
        )
        address = _grpc_address(config.ip, config.grpc_port)
        try:
            if checked.credentials is not None:
                self.grpc_port = self._grpc.add_secure_port(
                    address, checked.credentials
                )
            else:
                self.grpc_port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {address} for gRPC: {exc}") from None
        app = build_app(
            servicer,
            max_request_bytes=config.max_request_bytes,
            ready=lambda: self.serving,
            observe=metrics.observer("rest"),
            extra_routes=[metrics.route()],
            middlewares=[
                bearer_middleware(
                    self.tokens, metrics_require_auth=config.metrics_require_auth
                )
            ]
            if self.tokens
            else [],
        )
        self._web = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=_CLOSE_GRACE_SECONDS,
        )
        await self._web.setup()
        site = web.SockSite(self._web, rest_socket, ssl_context=checked.ssl_context)
        await site.start()
        self.rest_port = rest_socket.getsockname()[1]
        await self._grpc.start()
        await self._health.set(
            SERVICE.full_name, health_pb2.HealthCheckResponse.SERVING
        )

    async def _undo(
        self, checked: Preflight, rest_socket: socket.socket | None
    ) -> None:
        """Quietly undo a start that failed part-way."""
        if self._web is not None:
            await self._web.cleanup()
        if rest_socket is not None:
            rest_socket.close()
        if self._grpc is not None:
            await self._grpc.stop(None)
        checked.cgroups.teardown()
        self._web = self._grpc = self._health = None
        self.runner = self.metrics = None
        self.rest_port = self.grpc_port = 0

    def _log_started(self, checked: Preflight, notes: list[str]) -> None:
        config, cgroups = self.config, checked.cgroups
        # Warned only once started, so a failed start says one thing: why.
        if checked.task_user is None and os.geteuid() == 0:
            logger.warning(
                "tasks run as root: set task_user to run them as an unprivileged user"
            )
        if cgroups.mode == "none":
            logger.warning("no cgroup enforcement: %s", cgroups.reason)
        assert self.runner is not None
        total = self.runner.total
        scheme = "https" if checked.ssl_context else "http"
        logger.info(
            "REST listening on %s://%s",
            scheme,
            _grpc_address(config.ip, self.rest_port),
            extra={"protocol": "rest", "ip": config.ip, "port": self.rest_port},
        )
        logger.info(
            "gRPC listening on %s%s",
            _grpc_address(config.ip, self.grpc_port),
            " (TLS)" if checked.credentials else "",
            extra={"protocol": "grpc", "ip": config.ip, "port": self.grpc_port},
        )
        if checked.ssl_context is not None and config.tls_client_ca_file:
            logger.info("TLS: client certificates required on both ports (mTLS)")
        if self.tokens is not None:
            logger.info("auth: bearer token required on both ports")
        logger.info(
            "capacity: %s cores, %s MiB (%s); enforcement: %s%s",
            total.cores,
            total.memory_mb,
            "; ".join(notes),
            cgroups.mode,
            f" ({cgroups.reason})" if cgroups.reason else "",
            extra={
                "cores": total.cores,
                "memory_mb": total.memory_mb,
                "enforcement": cgroups.mode,
            },
        )
        path = os.path.abspath(self.config_path) if self.config_path else None
        logger.info(
            "config: %s",
            path or "defaults (no config file)",
            extra={"config_file": path},
        )

    async def stop(self) -> None:
        """Shut down gracefully; a second call shortens the tasks' grace.

        Does nothing on a server that never started: a failed start() has
        undone itself.
        """
        if not self._started:
            return
        if self._stopping is not None:
            if self.runner is not None:
                await self.runner.shutdown()
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        grace = self.config.kill_grace_seconds
        began = time.monotonic()
        runner = self.runner
        held = len(runner.queue) + len(runner.running) if runner else 0
        logger.info(
            "shutting down: cancelling %s task(s), grace %g s",
            held,
            grace,
            extra={"tasks": held, "grace_seconds": grace},
        )
        self.serving = False
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if runner is not None:
            await runner.shutdown()
            runner.executor.cgroups.teardown()
        # Every task is final now, so each watch and long-poll has been handed
        # its last attempt; both servers close together, each giving what is
        # still open _CLOSE_GRACE_SECONDS to finish.
        closing = []
        if self._grpc is not None:
            closing.append(self._grpc.stop(_CLOSE_GRACE_SECONDS))
        if self._web is not None:
            closing.append(self._web.cleanup())
        await asyncio.gather(*closing)
        took = time.monotonic() - began
        logger.info(
            "shut down in %.1f s", took, extra={"duration_seconds": round(took, 3)}
        )

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop; a second signal hurries."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop_requested.is_set():
                logger.info(
                    "second %s: cutting the grace short", signal.Signals(signum).name
                )
                hurry = asyncio.ensure_future(self.stop())
                self._background.add(hurry)
                hurry.add_done_callback(self._background.discard)
                return
            logger.info("received %s", signal.Signals(signum).name)
            stop_requested.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)
        try:
            await stop_requested.wait()
            await self.stop()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    def reload_tokens(self) -> None:
        """Re-read the token file (on SIGHUP); a bad file keeps the tokens held."""
        if self.tokens is None or self.tokens.token_file is None:
            logger.info("SIGHUP: no auth_token_file to reload")
            return
        logger.info("SIGHUP: reloading %s", self.tokens.token_file)
        self.tokens.reload()
