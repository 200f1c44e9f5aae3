"""One async client for a runner, over REST or gRPC, with the same API and results.

The protocol comes from the URL: ``http://`` and ``https://`` speak REST
(aiohttp), ``grpc://`` and ``grpcs://`` speak gRPC (grpc.aio and the generated
stub); a bare ``host:port`` takes the ``protocol`` argument. Both return the
same protobuf messages. Every failure leaves the client as one of the classes
of daggyr.errors, converted at one boundary (``_errors``) and raised ``from``
the original; a runner that cannot be reached is ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import grpc
import yarl
from google.protobuf import json_format, message

from daggyr.errors import (
    STATUS,
    DaggyrError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Unavailable,
    error_for_code,
)
from daggyr.httprule import PathTemplate
from daggyr.rpcs import Rpc, rpcs
from daggyr.table import FINAL_STATES
from daggyr.v1 import runner_pb2, runner_pb2_grpc, task_pb2

__all__ = ["FINAL_STATES", "Client", "Endpoint", "Protocol", "parse_url"]

logger = logging.getLogger(__name__)

Protocol = Literal["rest", "grpc"]
# Called with each attempt a wait sees, so a caller can show progress.
OnChange = Callable[[task_pb2.TaskAttempt], None]
Attempts = list[task_pb2.TaskAttempt]

_SCHEMES: dict[str, tuple[Protocol, bool]] = {
    "http": ("rest", False),
    "https": ("rest", True),
    "grpc": ("grpc", False),
    "grpcs": ("grpc", True),
}
# The runner's own bound on GetTask's wait_seconds.
MAX_WAIT_SECONDS = 60
_RPCS = {rpc.name: rpc for rpc in rpcs()}


@dataclass(frozen=True)
class Endpoint:
    """Where a runner listens and how to speak to it."""

    protocol: Protocol
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        scheme = {"rest": "http", "grpc": "grpc"}[self.protocol] + (
            "s" if self.tls else ""
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_url(url: str, protocol: Protocol | None = None) -> Endpoint:
    """The endpoint of ``url``; InvalidArgument says what is wrong with it."""
    text = (
        url if "://" in url else f"{'grpc' if protocol == 'grpc' else 'http'}://{url}"
    )
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in _SCHEMES:
        raise InvalidArgument(
            f"runner URL {url!r} has scheme {parts.scheme!r}: "
            "use http://, https://, grpc:// or grpcs://"
        )
    kind, tls = _SCHEMES[parts.scheme]
    if protocol is not None and protocol != kind:
        raise InvalidArgument(f"runner URL {url!r} is not a {protocol} URL")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise InvalidArgument(
            f"runner URL {url!r} must be SCHEME://HOST:PORT, e.g. http://127.0.0.1:2504"
        )
    return Endpoint(kind, parts.hostname, port, tls)


class Client:
    """A connection to one runner; use ``async with`` or call ``close()``.

    ``token`` (or the first token in ``token_file``) is sent as
    ``authorization: Bearer <token>`` on every call; ``ca_file`` is the CA
    bundle that signs the runner's TLS certificate (https:// or grpcs://).
    ``timeout`` bounds each call, on top of any time the call asks to wait.
    """

    def __init__(
        self,
        url: str,
        *,
        protocol: Protocol | None = None,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.endpoint = parse_url(url, protocol)
        self.url = self.endpoint.url
        self.timeout = timeout
        if ca_file is not None and not self.endpoint.tls:
            raise InvalidArgument(
                f"ca_file is for TLS: use https:// or grpcs:// instead of {self.url}"
            )
        if token is None and token_file is not None:
            token = _read_token(token_file)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        roots = _read_file("ca_file", ca_file) if ca_file is not None else None
        self._transport: _Transport
        if self.endpoint.protocol == "grpc":
            self._transport = _GrpcTransport(self.endpoint, headers, roots)
        else:
            self._transport = _RestTransport(self.endpoint, headers, roots)

    @property
    def protocol(self) -> Protocol:
        return self.endpoint.protocol

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; a second call does nothing."""
        await self._transport.close()

    # -- the RPCs ---------------------------------------------------------------

    async def submit(self, task_id: str, task: task_pb2.Task) -> task_pb2.TaskAttempt:
        """Submit ``task``; idempotent, so a submission may be retried as is."""
        request = runner_pb2.SubmitTaskRequest(task_id=task_id, task=task)
        reply: task_pb2.TaskAttempt = await self._call("SubmitTask", request)
        return reply

    async def get(self, task_id: str, wait_seconds: int = 0) -> task_pb2.TaskAttempt:
        """The task's attempt; with ``wait_seconds`` (at most 60) once it ends."""
        request = runner_pb2.GetTaskRequest(task_id=task_id, wait_seconds=wait_seconds)
        reply: task_pb2.TaskAttempt = await self._call(
            "GetTask", request, extra_time=wait_seconds
        )
        return reply

    async def cancel(self, task_id: str) -> task_pb2.TaskAttempt:
        """Stop the task; returns its final attempt."""
        request = runner_pb2.CancelTaskRequest(task_id=task_id)
        reply: task_pb2.TaskAttempt = await self._call("CancelTask", request)
        return reply

    async def delete(self, task_id: str) -> task_pb2.TaskAttempt:
        """Cancel the task if needed and forget it; returns its last attempt."""
        request = runner_pb2.DeleteTaskRequest(task_id=task_id)
        reply: task_pb2.TaskAttempt = await self._call("DeleteTask", request)
        return reply

    async def list(
        self, states: Iterable[int] = (), page_size: int = 0, page_token: str = ""
    ) -> tuple[Attempts, str]:
        """One page of tasks (without logs) and the token of the next, or ""."""
        request = runner_pb2.ListTasksRequest(
            state=list(states), page_size=page_size, page_token=page_token
        )
        reply: runner_pb2.ListTasksResponse = await self._call("ListTasks", request)
        return list(reply.tasks), reply.next_page_token

    async def iter_tasks(
        self, states: Iterable[int] = (), page_size: int = 0
    ) -> AsyncIterator[task_pb2.TaskAttempt]:
        """Every task held, page after page."""
        wanted = tuple(states)
        token = ""
        while True:
            tasks, token = await self.list(wanted, page_size, token)
            for attempt in tasks:
                yield attempt
            if not token:
                return

    async def capacity(self) -> task_pb2.CapacityReport:
        """The runner's total and free capacity, counts and enforcement mode."""
        request = runner_pb2.GetCapacityRequest()
        reply: task_pb2.CapacityReport = await self._call("GetCapacity", request)
        return reply

    async def watch(self, task_id: str) -> AsyncGenerator[task_pb2.TaskAttempt]:
        """Each state change of the task, ending with its final attempt."""
        rpc = _RPCS["WatchTask"]
        request = runner_pb2.WatchTaskRequest(task_id=task_id)
        stream = self._transport.stream(rpc, request)
        try:
            while True:
                with _errors(self.url):
                    try:
                        item = await stream.__anext__()
                    except StopAsyncIteration:
                        return
                yield item
        finally:
            await stream.aclose()

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        on_change: OnChange | None = None,
    ) -> task_pb2.TaskAttempt:
        """The task's final attempt, once it ends.

        gRPC follows WatchTask; REST repeats GetTask long-polls. ``on_change``
        sees each attempt on the way. Past ``timeout`` seconds this raises
        DeadlineExceeded; the task itself is left running.
        """
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                if self.protocol == "grpc":
                    return await self._wait_watching(task_id, on_change)
                return await self._wait_polling(task_id, on_change)
        except TimeoutError:
            if deadline.expired():
                raise DeadlineExceeded(
                    f"task {task_id!r} did not finish within {timeout:g} s"
                ) from None
            raise

    # -- internals --------------------------------------------------------------

    async def _call(
        self, name: str, request: message.Message, extra_time: float = 0
    ) -> Any:
        with _errors(self.url):
            return await self._transport.call(
                _RPCS[name], request, self.timeout + extra_time
            )

    async def _wait_watching(
        self, task_id: str, on_change: OnChange | None
    ) -> task_pb2.TaskAttempt:
        async with contextlib.aclosing(self.watch(task_id)) as attempts:
            async for attempt in attempts:
                if on_change is not None:
                    on_change(attempt)
                if attempt.state in FINAL_STATES:
                    return attempt
        # The stream ended early without an error: read the outcome directly.
        return await self._wait_polling(task_id, on_change)

    async def _wait_polling(
        self, task_id: str, on_change: OnChange | None
    ) -> task_pb2.TaskAttempt:
        seen: int | None = None
        wait_seconds = 0  # the first read reports the current state at once
        while True:
            attempt = await self.get(task_id, wait_seconds)
            if on_change is not None and attempt.state != seen:
                on_change(attempt)
            seen = attempt.state
            if attempt.state in FINAL_STATES:
                return attempt
            wait_seconds = MAX_WAIT_SECONDS


def _read_file(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read {option} {path}: {exc.strerror or exc}"
        ) from None


def _read_token(path: str) -> str:
    """The first token in the file, read as the runner reads its token file."""
    text = _read_file("token_file", path).decode("utf-8", "replace")
    for line in text.splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise InvalidArgument(f"token_file {path} holds no token")


# -- the error boundary -----------------------------------------------------------


class _HttpError(Exception):
    """A REST reply with an error status, before conversion."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


@contextlib.contextmanager
def _errors(url: str) -> Iterator[None]:
    """Turn whatever either transport raised into the project's exceptions."""
    try:
        yield
    except DaggyrError:
        raise
    except grpc.aio.AioRpcError as exc:
        raise _from_grpc(exc, url) from exc
    except _HttpError as exc:
        raise _from_http(exc, url) from exc
    except json_format.ParseError as exc:
        raise Internal(f"runner {url} sent a reply that is not valid: {exc}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        # Connection refused or reset, a reply cut short, a TLS failure.
        raise Unavailable(f"cannot reach runner {url}: {exc}") from exc
    except TimeoutError as exc:
        raise DeadlineExceeded(f"runner {url} did not answer in time") from exc


def _from_grpc(exc: grpc.aio.AioRpcError, url: str) -> DaggyrError:
    code = exc.code().value[0]
    details = exc.details() or exc.code().name
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        details = f"runner {url}: {details}"
    return error_for_code(code, details)


# The first gRPC code of each HTTP status, for replies without our JSON body.
_CODE_FOR_HTTP = {http: code for code, (_, http) in reversed(STATUS.items())}


def _from_http(exc: _HttpError, url: str) -> DaggyrError:
    try:
        body = json.loads(exc.body)
        code, text = int(body["code"]), str(body["message"])
    except (ValueError, TypeError, KeyError):
        # Not the runner's error body: a proxy's page or a bare status.
        code = _CODE_FOR_HTTP.get(exc.status, 2)
        snippet = exc.body[:200].decode("utf-8", "replace").strip()
        text = f"runner {url} answered HTTP {exc.status}: {snippet or 'no body'}"
    return error_for_code(code, text)


# -- the transports ---------------------------------------------------------------


class _Transport:
    async def call(
        self, rpc: Rpc, request: message.Message, timeout: float
    ) -> message.Message:
        raise NotImplementedError

    def stream(
        self, rpc: Rpc, request: message.Message
    ) -> AsyncGenerator[message.Message]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _GrpcTransport(_Transport):
    """grpc.aio and the generated stub; the channel opens on first use."""

    def __init__(
        self, endpoint: Endpoint, headers: dict[str, str], roots: bytes | None
    ) -> None:
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self.target = f"{host}:{endpoint.port}"
        self.metadata = tuple(headers.items())
        self.credentials = None
        if endpoint.tls:
            self.credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _get_stub(self) -> Any:
        if self._stub is None:
            if self.credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self.credentials)
            else:
                self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = runner_pb2_grpc.RunnerStub(self._channel)
        return self._stub

    async def call(
        self, rpc: Rpc, request: message.Message, timeout: float
    ) -> message.Message:
        method = getattr(self._get_stub(), rpc.name)
        reply: message.Message = await method(
            request, timeout=timeout, metadata=self.metadata
        )
        return reply

    async def stream(
        self, rpc: Rpc, request: message.Message
    ) -> AsyncGenerator[message.Message]:
        call = getattr(self._get_stub(), rpc.name)(request, metadata=self.metadata)
        try:
            async for item in call:
                yield item
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()


class _RestTransport(_Transport):
    """aiohttp against the routes the proto's http rules declare."""

    def __init__(
        self, endpoint: Endpoint, headers: dict[str, str], roots: bytes | None
    ) -> None:
        self.base = endpoint.url
        self.headers = headers
        self.ssl: ssl.SSLContext | bool = True
        if roots is not None:
            try:
                self.ssl = ssl.create_default_context(cadata=roots.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
                raise InvalidArgument(f"ca_file holds no usable PEM: {exc}") from None
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers)
        return self._session

    def _request(
        self, rpc: Rpc, request: message.Message, timeout: aiohttp.ClientTimeout
    ) -> Any:
        method, path, body = http_request(rpc, request)
        url = yarl.URL(self.base + path, encoded=True)
        return self._get_session().request(
            method, url, json=body, ssl=self.ssl, timeout=timeout
        )

    async def call(
        self, rpc: Rpc, request: message.Message, timeout: float
    ) -> message.Message:
        limit = aiohttp.ClientTimeout(total=timeout)
        async with self._request(rpc, request, limit) as response:
            data = await response.read()
            if response.status != 200:
                raise _HttpError(response.status, data)
        return json_format.Parse(data, rpc.response(), ignore_unknown_fields=True)

    async def stream(
        self, rpc: Rpc, request: message.Message
    ) -> AsyncGenerator[message.Message]:
        """grpc-gateway's stream: one ``{"result": ...}`` JSON object per line."""
        limit = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with self._request(rpc, request, limit) as response:
            if response.status != 200:
                raise _HttpError(response.status, await response.read())
            pending = b""
            # Lines are split here rather than by aiohttp's readline, whose
            # line-length limit a task's full output_log could exceed.
            async for chunk in response.content.iter_any():
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        yield _stream_item(rpc, line)
            if pending.strip():
                yield _stream_item(rpc, pending)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _stream_item(rpc: Rpc, line: bytes) -> message.Message:
    item = json.loads(line)
    if "error" in item:
        error = item["error"]
        raise error_for_code(int(error.get("code", 2)), str(error.get("message")))
    return json_format.ParseDict(
        item["result"], rpc.response(), ignore_unknown_fields=True
    )


def http_request(rpc: Rpc, request: message.Message) -> tuple[str, str, Any]:
    """The HTTP method, path with query, and JSON body of ``request``.

    Read from the RPC's google.api.http rule: path variables are
    percent-encoded whole ('/' and ':' included, so the id can never be taken
    for a verb or split), the body is what the rule names, and the remaining
    fields go into the query string.
    """
    rule = rpc.http
    if rule is None:
        raise Internal(f"{rpc.name} has no HTTP binding")
    kind = rule.WhichOneof("pattern")
    assert kind is not None
    template = PathTemplate.parse(getattr(rule, kind))
    fields = json_format.MessageToDict(request, preserving_proto_field_name=True)

    parts = []
    for segment in template.segments:
        if segment.literal is not None:
            parts.append(segment.literal)
            continue
        assert segment.variable is not None
        value = fields.pop(segment.variable, "")
        if value == "":
            raise InvalidArgument(f"{segment.variable} is required")
        parts.append(urllib.parse.quote(str(value), safe=""))
    path = "/" + "/".join(parts) + (f":{template.verb}" if template.verb else "")

    body: Any = None
    if rule.body == "*":
        body, fields = fields, {}
    elif rule.body:
        body = fields.pop(rule.body, {})
    query = []
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                raise Internal(f"{rpc.name}: message field {name} cannot be a query")
            text = str(item).lower() if isinstance(item, bool) else str(item)
            query.append((name, text))
    if query:
        path += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return kind.upper(), path, body
