"""The REST/JSON facade: routes read from the proto's google.api.http rules.

The route table is built once from the service descriptor and frozen before
serving; one catch-all handler matches the raw path against it and calls the
same servicer the gRPC server uses. JSON follows the proto3 mapping: proto
field names out, proto names or lowerCamelCase in. Errors are mapped as
grpc-gateway maps them, with a ``{"code", "message", "details"}`` body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_urldispatcher
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format, message

from daggyr.errors import (
    DaggyrError,
    InvalidArgument,
    NotFound,
    Unimplemented,
    http_status_for_code,
)
from daggyr.httprule import PathTemplate
from daggyr.rpcs import Rpc, rpcs

__all__ = ["RequestObserver", "Route", "build_app", "error_response", "to_json"]

logger = logging.getLogger(__name__)

# Called once per REST request with the RPC name and the gRPC code name.
RequestObserver = Callable[[str, str], None]
_HTTP_METHODS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    method: str
    template: PathTemplate
    rpc: Rpc
    body: str


def routes_for(methods: Sequence[Rpc]) -> tuple[Route, ...]:
    """Every HTTP binding of ``methods``, verb templates first."""
    found = []
    for rpc in methods:
        if rpc.http is None:
            continue
        for rule in (rpc.http, *rpc.http.additional_bindings):
            kind = rule.WhichOneof("pattern")
            if kind not in _HTTP_METHODS:
                continue
            template = PathTemplate.parse(getattr(rule, kind))
            found.append(Route(kind.upper(), template, rpc, rule.body))
    # A literal ':verb' is more specific than a '**' that would swallow it.
    found.sort(key=lambda r: (not r.template.verb, -len(r.template.segments)))
    return tuple(found)


def to_json(msg: message.Message) -> dict[str, Any]:
    """The proto3 JSON form with proto field names and every plain field."""
    data: dict[str, Any] = json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return data


def error_response(error: DaggyrError) -> web.Response:
    """The grpc-gateway-shaped error body for ``error``."""
    body = {"code": error.code, "message": error.message, "details": []}
    return web.json_response(body, status=http_status_for_code(error.code))


def _merge(data: object, target: message.Message, what: str) -> None:
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    try:
        json_format.ParseDict(data, target)
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply") from None
    except json_format.ParseError as exc:
        first = str(exc).splitlines()[0].strip()
        raise InvalidArgument(f"invalid {what}: {first}") from None


# How long a client may take to send a request body.
BODY_SECONDS = 30


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidArgument(f"request body has the key {key!r} twice")
        result[key] = value
    return result


async def _read_body(request: web.Request) -> object:
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=request.content_length
        )
    try:
        async with asyncio.timeout(BODY_SECONDS):
            raw = await request.read()
    except TimeoutError:
        raise InvalidArgument(
            f"the request body did not arrive within {BODY_SECONDS} s"
        ) from None
    except (HttpProcessingError, RequestPayloadError) as exc:
        why = str(exc).rsplit("message:", 1)[-1].strip()
        raise InvalidArgument(f"the request body cannot be read: {why}") from None
    if not raw.strip():
        return {}
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("request body is nested too deeply") from None


def _query(
    request: web.Request, target: message.Message, bound: dict[str, str]
) -> None:
    fields = {}
    for field in target.DESCRIPTOR.fields:
        if field.name in bound:
            continue  # given in the path: a query parameter may not override it
        fields[field.name] = field
        fields[field.json_name] = field
    data: dict[str, Any] = {}
    for key in request.query:
        if key not in fields:
            raise InvalidArgument(f"unknown query parameter {key!r}")
        field = fields[key]
        values = request.query.getall(key)
        if field.is_repeated:
            data[field.name] = values
        elif len(values) > 1:
            raise InvalidArgument(f"query parameter {key!r} given more than once")
        else:
            data[field.name] = values[0]
    if data:
        _merge(data, target, "query parameters")


async def _build_request(
    request: web.Request, route: Route, bound: dict[str, str]
) -> message.Message:
    msg = route.rpc.request()
    if route.body == "*":
        _merge(await _read_body(request), msg, "request body")
    elif route.body:
        _merge(await _read_body(request), getattr(msg, route.body), route.body)
    if route.body != "*":
        _query(request, msg, bound)
    for name, value in bound.items():
        setattr(msg, name, value)
    return msg


class _MethodNotAllowed(Unimplemented):
    """The path is a route, the method is not: 405 with an Allow header."""

    def __init__(self, message: str, allowed: set[str]) -> None:
        super().__init__(message)
        self.allowed = allowed | ({"HEAD"} if "GET" in allowed else set())


class _Facade:
    def __init__(
        self,
        servicer: object,
        observe: RequestObserver | None,
        routes: tuple[Route, ...],
        fixed: dict[str, set[str]],
    ) -> None:
        self.servicer = servicer
        self.observe = observe
        self.routes = routes
        # Paths served outside the facade (/ready, /metrics) and their methods.
        self.fixed = fixed

    def _find(self, request: web.Request) -> tuple[Route, dict[str, str]]:
        raw_path = request.raw_path.split("?", 1)[0]
        method = "GET" if request.method == "HEAD" else request.method
        allowed = set(self.fixed.get(raw_path, ()))
        for route in self.routes:
            try:
                bound = route.template.match(raw_path)
            except UnicodeDecodeError:
                raise InvalidArgument(
                    "the request path is not percent-encoded UTF-8"
                ) from None
            if bound is None:
                continue
            streaming_head = route.rpc.server_streaming and request.method == "HEAD"
            if route.method == method and not streaming_head:
                return route, bound
            allowed.add(route.method)
        if allowed:
            raise _MethodNotAllowed(
                f"{request.method} is not supported on this path; "
                f"use {', '.join(sorted(allowed))}",
                allowed,
            )
        raise NotFound(f"no API route for {request.method} {raw_path}")

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        rpc_name = "unknown"
        try:
            route, bound = self._find(request)
            rpc_name = route.rpc.name
            msg = await _build_request(request, route, bound)
            call = getattr(self.servicer, route.rpc.name)
            if route.rpc.server_streaming:
                return await self._stream(request, call(msg), rpc_name)
            reply = await call(msg)
            self._observed(rpc_name, "OK")
            return web.json_response(to_json(reply))
        except DaggyrError as exc:
            self._observed(rpc_name, exc.code_name)
            response = error_response(exc)
            if isinstance(exc, _MethodNotAllowed):
                response.set_status(405)
                response.headers["Allow"] = ", ".join(sorted(exc.allowed))
            return response
        except web.HTTPRequestEntityTooLarge:
            self._observed(rpc_name, "RESOURCE_EXHAUSTED")
            body = _too_large_body(request.client_max_size)
            return web.json_response(body, status=413)

    async def _stream(
        self, request: web.Request, stream: Any, rpc_name: str
    ) -> web.StreamResponse:
        """grpc-gateway style: one ``{"result": ...}`` JSON object per line."""
        iterator = stream.__aiter__()
        first = await iterator.__anext__()  # errors here become a plain error reply
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            item = first
            while True:
                line = json.dumps({"result": to_json(item)}) + "\n"
                await response.write(line.encode())
                try:
                    item = await iterator.__anext__()
                except StopAsyncIteration:
                    break
            await response.write_eof()
            self._observed(rpc_name, "OK")
        except (ConnectionResetError, ConnectionError):
            self._observed(rpc_name, "CANCELLED")
        finally:
            await iterator.aclose()
        return response

    def _observed(self, rpc_name: str, code: str) -> None:
        if self.observe is not None:
            self.observe(rpc_name, code)


@web.middleware
async def _no_tracebacks(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Any unexpected error is logged here and answered without its details."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        logger.exception("REST %s %s failed", request.method, request.raw_path)
        body = {"code": 13, "message": "internal error: see the runner's log"}
        return web.json_response({**body, "details": []}, status=500)


async def _expect_within_limit(request: web.Request) -> None:
    """Refuse ``Expect: 100-continue`` at once when the body would be too big."""
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit,
            actual_size=request.content_length,
            text=json.dumps(_too_large_body(limit)),
            content_type="application/json",
        )
    await web_urldispatcher._default_expect_handler(request)


def _too_large_body(limit: int) -> dict[str, Any]:
    return {
        "code": 8,
        "message": f"request body exceeds max_request_bytes ({limit} bytes): "
        "send a smaller body or raise max_request_bytes in the runner's config",
        "details": [],
    }


def build_app(
    servicer: object,
    *,
    max_request_bytes: int,
    ready: Callable[[], bool],
    observe: RequestObserver | None = None,
    middlewares: Sequence[Any] = (),
    extra_routes: Sequence[web.RouteDef] = (),
) -> web.Application:
    """The aiohttp application serving every annotated RPC, /ready and extras."""
    fixed = {"/ready": {"GET"}}
    for route in extra_routes:
        fixed.setdefault(route.path, set()).add(route.method)
    facade = _Facade(servicer, observe, routes_for(rpcs()), fixed)

    async def ready_handler(request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)

    app = web.Application(
        client_max_size=max_request_bytes,
        middlewares=[_no_tracebacks, *middlewares],
    )
    app.router.add_get("/ready", ready_handler)
    app.router.add_routes(extra_routes)
    app.router.add_route(
        "*", "/{tail:.*}", facade.dispatch, expect_handler=_expect_within_limit
    )
    app.router.freeze()
    return app
