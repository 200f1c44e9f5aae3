"""The runner's configuration: a JSON file validated strictly, then flags on top.

Unknown keys, wrong types and impossible values are start-up errors that name
the key and the value; nothing falls back to a default silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["CapacityOverrides", "Config", "ConfigError", "load_config"]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CapacityOverrides(_Strict):
    """Replacements for the detected capacity."""

    # 0 means every logical CPU, as in the original runner.
    cores: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    memory_mb: int | None = Field(default=None, gt=0, lt=2**32)


class Config(_Strict):
    """Every setting of a runner, with its default."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, populate_by_name=True
    )

    ip: str = "127.0.0.1"
    port: int = Field(default=2504, ge=0, le=65535)
    grpc_port: int = Field(default=2505, ge=0, le=65535, alias="grpc-port")
    # Threads of the pool that runs blocking work (cgroup files, process
    # clean-up, the gRPC server's synchronous parts) off the event loop.
    web_threads: int = Field(default=8, ge=1, le=1024, alias="web-threads")
    capacity_overrides: CapacityOverrides = CapacityOverrides()

    default_memory_mb: int = Field(default=512, gt=0, lt=2**32)
    max_output_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    result_ttl_seconds: float = Field(default=3600, gt=0, allow_inf_nan=False)
    max_queued_tasks: int = Field(default=10000, ge=0)
    max_backfill_overtakes: int = Field(default=8, ge=0)
    kill_grace_seconds: float = Field(default=5, ge=0, le=3600, allow_inf_nan=False)
    max_task_pids: int = Field(default=4096, ge=1, le=4194304)
    max_request_bytes: int = Field(default=4 << 20, ge=1024, le=1 << 30)

    task_user: str | None = None
    require_cgroups: bool = False
    cgroup_root: str = Field(default="daggyr", min_length=1)
    temp_root: str | None = None

    # repr=False: the tokens stay out of any log line that prints the config.
    auth_tokens: list[str] = Field(default_factory=list, repr=False)
    auth_token_file: str | None = None
    metrics_require_auth: bool = False
    allow_insecure_bind: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None

    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @model_validator(mode="after")
    def _check(self) -> Config:
        name = self.cgroup_root
        if name in (".", "..") or "\0" in name:
            raise ValueError(f"cgroup_root {name!r} is not a usable directory name")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if first["type"] == "value_error":
        return first["msg"].removeprefix("Value error, ")
    if key.startswith("auth_tokens"):
        return f"key {key!r}: {first['msg'].lower()}"  # never echo a secret
    return f"key {key!r}: {first['msg'].lower()} (got {value!r})"


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """The file's settings (or the defaults) with ``overrides`` applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(
                f"cannot read config file {path}: {exc.strerror}"
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"config error{where}: {_describe(exc)}") from exc
