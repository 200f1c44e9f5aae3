"""Bearer-token authentication: one token check behind both protocols.

Tokens come from the config's ``auth_tokens`` and from ``auth_token_file`` (one
token per line; blank lines and ``#`` comments ignored), which ``reload``
re-reads (the server calls it on SIGHUP). A token is never logged, echoed in an
error message or passed to a task: messages name a token by its position only.

What stays open without a token: gRPC's ``grpc.health.v1.Health`` (load
balancers probe it), REST's ``/ready`` and, unless ``metrics_require_auth``,
``/metrics``. Server reflection needs a token like the runner's own service:
grpcurl sends ``-H 'authorization: Bearer ...'`` with its reflection calls too.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from daggyr.config import Config

__all__ = [
    "CHALLENGE",
    "SecuritySetupError",
    "TokenCheck",
    "bearer_interceptor",
    "bearer_middleware",
    "check_bind",
    "is_loopback",
]

logger = logging.getLogger(__name__)

CHALLENGE = 'Bearer realm="daggyr"'
_REFUSED = "missing or invalid bearer token: send '{}: Bearer <token>'"
_OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)
_OPEN_REST_PATHS = ("/ready",)


class SecuritySetupError(Exception):
    """The auth or TLS settings cannot be used; the message names the setting."""


def _usable(token: str) -> bool:
    """A token a header can carry exactly: non-empty visible ASCII, no spaces."""
    return bool(token) and all("!" <= ch <= "~" for ch in token)


def _read_token_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise SecuritySetupError(f"cannot read auth_token_file {path}: {why}") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _usable(token):
            raise SecuritySetupError(
                f"auth_token_file {path} line {number}: a token must be visible "
                "ASCII without spaces"
            )
        tokens.append(token)
    return tokens


class TokenCheck:
    """The set of accepted bearer tokens and the one comparison against it."""

    def __init__(self, tokens: Sequence[str], token_file: str | None) -> None:
        for index, token in enumerate(tokens):
            if not _usable(token):
                raise SecuritySetupError(
                    f"auth_tokens[{index}]: a token must be non-empty visible "
                    "ASCII without spaces"
                )
        self._configured = tuple(tokens)
        self.token_file = token_file
        self._tokens: tuple[bytes, ...] = ()
        self._load()

    @classmethod
    def from_config(cls, config: Config) -> TokenCheck | None:
        """The check ``config`` asks for, or None when auth is off."""
        if not config.auth_tokens and config.auth_token_file is None:
            return None
        return cls(config.auth_tokens, config.auth_token_file)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"<TokenCheck {len(self)} token(s), file={self.token_file!r}>"

    def _load(self) -> None:
        from_file: list[str] = []
        if self.token_file is not None:
            from_file = _read_token_file(self.token_file)
            _warn_if_readable_by_others(self.token_file)
        tokens = {*self._configured, *from_file}
        self._tokens = tuple(token.encode() for token in sorted(tokens))
        logger.info(
            "auth: %d bearer token(s) loaded (%d from auth_tokens, %d from %s)",
            len(self._tokens),
            len(self._configured),
            len(from_file),
            self.token_file or "no token file",
        )
        if not self._tokens:
            logger.warning("auth: no token loaded: every request will be refused")

    def reload(self) -> bool:
        """Re-read the token file; on failure keep the tokens held and say why."""
        try:
            self._load()
        except SecuritySetupError as exc:
            logger.error("auth: %s; keeping the %d token(s) held", exc, len(self))
            return False
        return True

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the tokens, compared in constant time.

        Every held token is compared, so the time taken does not tell which one
        (if any) came close.
        """
        candidate = token.encode() if token.isascii() else b""
        found = False
        for known in self._tokens:
            found |= hmac.compare_digest(candidate, known)
        return found

    def refusal(self, values: Sequence[str]) -> str | None:
        """Why the Authorization values do not authenticate, or None if they do.

        Exactly one ``Bearer <token>`` value is accepted; the scheme is matched
        in any case (RFC 6750), the token exactly.
        """
        if not values:
            return "no authorization"
        if len(values) > 1:
            return "more than one authorization value"
        scheme, space, token = values[0].partition(" ")
        if not space or scheme.lower() != "bearer":
            return "not a Bearer credential"
        if not self.accepts(token):
            return "unknown token"
        return None


def _warn_if_readable_by_others(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        logger.warning("auth: token file %s is readable by every user", path)


def bearer_interceptor(check: TokenCheck) -> grpc.aio.ServerInterceptor:
    """A gRPC interceptor refusing calls without a good token (UNAUTHENTICATED)."""
    return _BearerInterceptor(check)


class _BearerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, check: TokenCheck) -> None:
        self.check = check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = handler_call_details.method
        if method.startswith(_OPEN_GRPC_PREFIXES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        values = [str(v) for k, v in metadata or () if k == "authorization"]
        reason = self.check.refusal(values)
        handler = await continuation(handler_call_details)
        if reason is None:
            return handler
        logger.debug("gRPC %s refused: %s", method, reason)
        return _refusing(handler)


async def _deny(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, _REFUSED.format("authorization")
    )


def _refusing(handler: Any) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only refuses the call."""
    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(_deny)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny)
    return grpc.unary_stream_rpc_method_handler(_deny)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_middleware(
    check: TokenCheck, *, metrics_require_auth: bool = False
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """An aiohttp middleware answering 401 to requests without a good token."""
    open_paths = set(_OPEN_REST_PATHS)
    if not metrics_require_auth:
        open_paths.add("/metrics")

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Decided by the route that will answer, not by a path that an
        # encoding trick could make look like an open one.
        route = request.match_info.route.resource
        if route is not None and route.canonical in open_paths:
            return await handler(request)
        reason = check.refusal(request.headers.getall("Authorization", []))
        if reason is None:
            return await handler(request)
        logger.debug("REST %s %s refused: %s", request.method, request.path, reason)
        body = {"code": 16, "message": _REFUSED.format("Authorization"), "details": []}
        challenge = CHALLENGE
        if reason == "unknown token":
            challenge += ', error="invalid_token"'
        return web.json_response(
            body, status=401, headers={"WWW-Authenticate": challenge}
        )

    return bearer_auth


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: Config, auth: TokenCheck | None) -> None:
    """Refuse a non-loopback address without auth unless forced (then warn).

    Bearer tokens and client certificates (mTLS) each count as auth.
    """
    if auth is not None or config.tls_client_ca_file or is_loopback(config.ip):
        return
    if not config.allow_insecure_bind:
        raise SecuritySetupError(
            f"refusing to listen on {config.ip} without authentication: set "
            "auth_tokens, auth_token_file or tls_client_ca_file, bind to "
            "127.0.0.1, or force it with --allow-insecure-bind (config: "
            "allow_insecure_bind)"
        )
    logger.warning(
        "listening on %s without authentication (allow_insecure_bind): anyone "
        "who can reach it can run commands",
        config.ip,
    )
