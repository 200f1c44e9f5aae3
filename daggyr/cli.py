"""The ``daggyr`` command: serve (the default), or act as a client.

``daggyr [--config FILE] [-d] ...`` runs a runner; ``daggyr submit|status|
cancel|capacity|list ...`` talks to one (see daggyr.cli_client).

Serving exits 0 after a clean shutdown, EXIT_FAILURE (1) when the runner fails
at run time (a port taken, cgroup set-up), and EXIT_CONFIG (2) for any
configuration mistake, found before anything is bound, always with one line
on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from daggyr.config import Config, ConfigError, load_config
from daggyr.server import Server, StartupConfigError, StartupError

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "main", "serve_parser"]

CLIENT_COMMANDS = ("submit", "status", "cancel", "capacity", "list")
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daggyr",
        description="Run a daggyr runner: REST on 127.0.0.1:2504, gRPC on "
        "127.0.0.1:2505. Client commands: " + ", ".join(CLIENT_COMMANDS) + ".",
    )
    parser.add_argument("--config", metavar="FILE", help="JSON config file")
    parser.add_argument("--ip", help="address to bind (config: ip)")
    parser.add_argument("--port", type=int, help="REST port (config: port)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (config: grpc-port)")
    parser.add_argument(
        "--cgroup-root", help="name of the runner's cgroup root (config: cgroup_root)"
    )
    parser.add_argument(
        "--log-level", type=str.upper, help="DEBUG, INFO, WARNING or ERROR"
    )
    parser.add_argument(
        "--allow-insecure-bind",
        action="store_true",
        default=None,
        help="listen on a non-loopback address without auth (config: "
        "allow_insecure_bind)",
    )
    parser.add_argument(
        "-d", "--daemon", action="store_true", help="detach once both ports listen"
    )
    parser.add_argument("--pidfile", help="with -d: file holding the daemon's pid")
    parser.add_argument("--log-file", help="with -d: file the daemon logs to")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "ip": args.ip,
        "port": args.port,
        "grpc_port": args.grpc_port,
        "cgroup_root": args.cgroup_root,
        "log_level": args.log_level,
        "allow_insecure_bind": args.allow_insecure_bind,
    }


def setup_logging(level: str, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def _serve(config: Config, config_path: str | None) -> int:
    server = Server(config, config_path)
    try:
        await server.start()
    except StartupConfigError as exc:
        print(f"daggyr: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        logging.getLogger("daggyr").error("cannot start: %s", exc)
        return EXIT_FAILURE
    await server.serve_until_signalled()
    return 0


def serve(argv: Sequence[str]) -> int:
    args = serve_parser().parse_args(argv)
    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"daggyr: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.daemon:
        from daggyr.daemon import daemonize

        return daemonize(config, args.config, args.pidfile, args.log_file)
    if args.pidfile or args.log_file:
        print("daggyr: --pidfile and --log-file go with -d", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    return asyncio.run(_serve(config, args.config))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daggyr`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in CLIENT_COMMANDS:
        from daggyr.cli_client import main as client_main

        return client_main(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
