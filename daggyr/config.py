"""The runner's configuration: a JSON file validated strictly, then flags on top.

Unknown keys, wrong types and impossible values are start-up errors that name
the key and the value; nothing falls back to a default silently.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

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

    # min_length=1 on string settings: "" is a mistake, never "the default".
    ip: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=2504, ge=0, le=65535)
    grpc_port: int = Field(default=2505, ge=0, le=65535, alias="grpc-port")
    # Threads of the event loop's default executor, which runs blocking work
    # (cgroup and temporary-directory clean-up, DNS) off the loop; requests on
    # both protocols are served on the loop itself (grpc.aio included).
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

    task_user: str | None = Field(default=None, min_length=1)
    require_cgroups: bool = False
    cgroup_root: str = Field(default="daggyr", min_length=1)
    temp_root: str | None = Field(default=None, min_length=1)

    # repr=False: the tokens stay out of any log line that prints the config.
    auth_tokens: list[str] = Field(default_factory=list, repr=False)
    auth_token_file: str | None = Field(default=None, min_length=1)
    metrics_require_auth: bool = False
    allow_insecure_bind: bool = False
    tls_cert_file: str | None = Field(default=None, min_length=1)
    tls_key_file: str | None = Field(default=None, min_length=1)
    tls_client_ca_file: str | None = Field(default=None, min_length=1)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _check(self) -> Config:
        name = self.cgroup_root
        parts = name.split("/")
        if "\0" in name or (not name.startswith("/") and len(parts) > 1):
            raise ValueError(
                f"cgroup_root {name!r} must be one directory name, or an absolute "
                "path to a delegated cgroup v2 subtree"
            )
        if any(part in (".", "..") for part in parts):
            raise ValueError(f"cgroup_root {name!r} must not contain . or ..")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self


# pydantic's error types in the words of a JSON file.
_PHRASES = {
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "literal_error": "must be {expected}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "string_too_short": "must not be empty",
}


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _suggestion(loc: tuple[int | str, ...]) -> str:
    """' (did you mean ...?)' for a misspelt key, else ''."""
    known = {1: _keys(Config), 2: _keys(CapacityOverrides)}.get(len(loc), [])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(value: object) -> object:
    return f"{value:g}" if isinstance(value, float) else value


def _shown(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"unknown key {key!r}{_suggestion(first['loc'])}"
    if first["type"] == "value_error":
        return first["msg"].removeprefix("Value error, ")
    phrase = _PHRASES.get(first["type"])
    if phrase is None:
        what = first["msg"][:1].lower() + first["msg"][1:]
    else:
        ctx = first.get("ctx", {})
        what = phrase.format(**{k: _number(v) for k, v in ctx.items()})
    if key.startswith("auth_tokens"):
        return f"key {key!r}: {what}"  # never echo a secret
    return f"key {key!r}: {what} (got {_shown(first.get('input'))})"


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """The file's settings (or the defaults) with ``overrides`` applied on top.

    The file is validated on its own first, so a flag never hides a mistake in
    it; then the flags are applied and the result validated again.
    """
    data = _read_file(path) if path is not None else {}
    if path is not None:
        _validate(data, f" in {path}")
    flags = False
    for name, value in (overrides or {}).items():
        if value is not None:
            # A flag replaces the key however the file spelt it.
            data.pop(name, None)
            data[Config.model_fields[name].alias or name] = value
            flags = True
    return _validate(data, " in the command-line flags" if flags else "")


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} "
            f"at offset {exc.start}"
        ) from None
    if not text.strip():
        raise ConfigError(f"config file {path} is empty: write {{}} for defaults")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        key = str(exc)
        raise ConfigError(f"config file {path} sets key {key!r} twice") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def _validate(data: dict[str, Any], where: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config error{where}: {_describe(exc)}") from exc
