"""What a runner's config names, checked and resolved before anything is bound.

A mistake found here is a StartupConfigError (``daggyr`` exits 2): nothing is
bound or started yet and nothing has been logged above DEBUG, so the one line
naming the key is all a person sees. The checks that log when they pass (the
tokens loaded, a forced insecure bind) run last for that reason.
"""

from __future__ import annotations

import logging
import os
import pwd
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from daggyr.auth import SecuritySetupError, TokenCheck, check_bind
from daggyr.cgroups import CgroupError, CgroupManager, detect
from daggyr.config import Config, ConfigError
from daggyr.executor import TaskUser
from daggyr.task_user import unreachable_reason
from daggyr.tls import grpc_credentials, rest_ssl_context

__all__ = ["Preflight", "StartupConfigError", "StartupError", "preflight"]

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """The runner cannot start; the message says why, for a person."""


class StartupConfigError(StartupError, ConfigError):
    """A configuration mistake found at start-up, before anything is bound."""


@dataclass(frozen=True)
class Preflight:
    """Everything the config names, resolved and known to be usable."""

    cgroups: CgroupManager
    task_user: TaskUser | None
    temp_root: Path
    tokens: TokenCheck | None
    ssl_context: ssl.SSLContext | None
    credentials: grpc.ServerCredentials | None


def preflight(config: Config) -> Preflight:
    """Check and resolve ``config``; StartupConfigError names what is wrong.

    Creates ``temp_root`` if it is missing; binds, starts and logs nothing else.
    """
    try:
        task_user = _task_user(config)
        cgroups = detect(config.cgroup_root, require=config.require_cgroups)
        temp_root = _temp_root(config, task_user)
        ssl_context = rest_ssl_context(config)
        credentials = grpc_credentials(config)
        tokens = TokenCheck.from_config(config)
        check_bind(config, tokens)
    except (CgroupError, SecuritySetupError) as exc:
        raise StartupConfigError(str(exc)) from None
    return Preflight(cgroups, task_user, temp_root, tokens, ssl_context, credentials)


def _task_user(config: Config) -> TaskUser | None:
    if config.task_user is None:
        return None
    if os.geteuid() != 0:
        raise StartupConfigError(
            f"task_user {config.task_user!r} needs the runner to run as root"
        )
    try:
        entry = pwd.getpwnam(config.task_user)
    except KeyError:
        raise StartupConfigError(
            f"task_user {config.task_user!r} does not exist"
        ) from None
    return TaskUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _temp_root(config: Config, task_user: TaskUser | None) -> Path:
    """The absolute temp root, made if missing, writable and reachable."""
    # Absolute: tasks get their directory in it as cwd and TMPDIR.
    default = f"/tmp/{Path(config.cgroup_root).name}"
    root = Path(config.temp_root or default).absolute()
    try:
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupConfigError(f"temp_root {root} is not a directory") from None
    except OSError as exc:
        raise StartupConfigError(
            f"temp_root {root} cannot be made: {exc.strerror or exc}"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise StartupConfigError(f"temp_root {root} is not writable by the runner")
    if task_user is not None:
        why = unreachable_reason(root, task_user.uid, task_user.gid)
        if why:
            raise StartupConfigError(
                f"task_user {task_user.name!r} cannot reach temp_root {root}: {why}"
            )
    return root
