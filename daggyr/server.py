"""One asyncio process serving both protocols over one servicer and one table.

``Server.start`` binds both ports (port 0 picks a free one; the bound port is
read back into ``rest_port`` and ``grpc_port``). ``Server.stop`` is graceful:
it refuses new tasks, cancels every task with its grace, removes the cgroups,
then closes both servers; a second call while the first runs cuts the grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
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

from daggyr.auth import (
    SecuritySetupError,
    TokenCheck,
    bearer_interceptor,
    bearer_middleware,
    check_bind,
)
from daggyr.capacity import detect_capacity
from daggyr.cgroups import CgroupError, detect
from daggyr.config import Config, ConfigError
from daggyr.executor import Executor, TaskUser
from daggyr.grpc_server import add_services
from daggyr.metrics import Metrics
from daggyr.rest import build_app
from daggyr.rpcs import SERVICE
from daggyr.runner import Runner
from daggyr.servicer import RunnerServicer
from daggyr.task_user import unreachable_reason
from daggyr.tls import grpc_credentials, rest_ssl_context

__all__ = ["Server", "StartupError"]

logger = logging.getLogger(__name__)

# Loops whose default executor a Server has sized (config web-threads). Only
# the first Server on a loop sets it, so no pool is ever orphaned; the loop
# shuts it down when it closes.
_SIZED_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


class StartupError(Exception):
    """The runner cannot start; the message says why, for a person."""


def _task_user(config: Config) -> TaskUser | None:
    if config.task_user is None:
        if os.geteuid() == 0:
            logger.warning(
                "tasks run as root: set task_user to run them as an unprivileged user"
            )
        return None
    if os.geteuid() != 0:
        raise StartupError(
            f"task_user {config.task_user!r} needs the runner to run as root"
        )
    try:
        entry = pwd.getpwnam(config.task_user)
    except KeyError:
        raise StartupError(f"task_user {config.task_user!r} does not exist") from None
    return TaskUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


_TASK_DIR = re.compile(r"[0-9]+-")


def _temp_root(config: Config) -> Path:
    """The runner's own temporary tree, emptied of a previous run's leftovers."""
    # Absolute: tasks get their directory in it as cwd and TMPDIR.
    default = f"/tmp/{Path(config.cgroup_root).name}"
    root = Path(config.temp_root or default).absolute()
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    # Only names this runner makes (<n>-<id>) are removed, so a temp_root
    # shared with anything else (even /tmp itself) loses nothing of theirs.
    for leftover in root.iterdir():
        ours = _TASK_DIR.match(leftover.name) and not leftover.is_symlink()
        if ours and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return root


def _listen(host: str, port: int, what: str) -> socket.socket:
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}"
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
        """Detect, clean up, bind both ports and serve; StartupError says why not."""
        config = self.config
        loop = asyncio.get_running_loop()
        if loop not in _SIZED_LOOPS:
            # Blocking work (cgroup and temp clean-up, DNS) runs in this pool;
            # both servers handle requests on the event loop itself.
            pool = ThreadPoolExecutor(config.web_threads, thread_name_prefix="daggyr")
            loop.set_default_executor(pool)
            _SIZED_LOOPS.add(loop)
        try:
            self.tokens = TokenCheck.from_config(config)
            check_bind(config, self.tokens)
            ssl_context = rest_ssl_context(config)
            credentials = grpc_credentials(config)
        except SecuritySetupError as exc:
            raise StartupError(str(exc)) from None
        try:
            cgroups = detect(config.cgroup_root, require=config.require_cgroups)
        except (CgroupError, ConfigError) as exc:
            raise StartupError(str(exc)) from None
        if cgroups.mode == "none":
            logger.warning("no cgroup enforcement: %s", cgroups.reason)
        try:
            cgroups.setup()  # logs each leftover cgroup it cleans
        except CgroupError as exc:
            raise StartupError(f"cgroup set-up failed: {exc}") from None
        total, notes = detect_capacity(
            config.capacity_overrides.cores,
            config.capacity_overrides.memory_mb,
            cgroups.own_limits(),
        )
        task_user, temp_root = _task_user(config), _temp_root(config)
        if task_user is not None:
            why = unreachable_reason(temp_root, task_user.uid, task_user.gid)
            if why:
                raise StartupError(
                    f"task_user {task_user.name!r} cannot reach temp_root "
                    f"{temp_root}: {why}"
                )
        executor = Executor(
            cgroups,
            temp_root,
            config.max_output_bytes,
            config.kill_grace_seconds,
            config.max_task_pids,
            task_user,
        )
        self.runner = Runner(
            executor,
            total,
            default_memory_mb=config.default_memory_mb,
            max_queued_tasks=config.max_queued_tasks,
            max_backfill_overtakes=config.max_backfill_overtakes,
            result_ttl_seconds=config.result_ttl_seconds,
        )
        servicer = RunnerServicer(self.runner)
        self.metrics = metrics = Metrics(self.runner)

        rest_socket = _listen(config.ip, config.port, "REST")
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
            if credentials is not None:
                self.grpc_port = self._grpc.add_secure_port(address, credentials)
            else:
                self.grpc_port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            rest_socket.close()
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
        self._web = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._web.setup()
        await web.SockSite(self._web, rest_socket, ssl_context=ssl_context).start()
        self.rest_port = rest_socket.getsockname()[1]
        await self._grpc.start()
        await self._health.set(
            SERVICE.full_name, health_pb2.HealthCheckResponse.SERVING
        )
        self.serving = True

        scheme = "https" if ssl_context else "http"
        logger.info(
            "REST listening on %s://%s",
            scheme,
            _grpc_address(config.ip, self.rest_port),
            extra={"protocol": "rest", "ip": config.ip, "port": self.rest_port},
        )
        logger.info(
            "gRPC listening on %s%s",
            _grpc_address(config.ip, self.grpc_port),
            " (TLS)" if credentials else "",
            extra={"protocol": "grpc", "ip": config.ip, "port": self.grpc_port},
        )
        if ssl_context is not None and config.tls_client_ca_file:
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
        """Shut down gracefully; a second call shortens the tasks' grace."""
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
        if self._grpc is not None:
            await self._grpc.stop(1.0)
        if self._web is not None:
            await self._web.cleanup()
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
