"""The gRPC side: daggyr.v1.Runner from the descriptor, plus health and reflection.

Handlers are built from the service descriptor and bound to the shared
servicer. Requests arrive as bytes and are parsed here, so a malformed message
is INVALID_ARGUMENT naming the type instead of grpc's own INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from daggyr.errors import DaggyrError, InvalidArgument
from daggyr.rpcs import SERVICE, Rpc, rpcs

__all__ = ["RequestObserver", "add_services", "grpc_code"]

logger = logging.getLogger(__name__)

# Called once per gRPC call with the RPC name and the gRPC code name.
RequestObserver = Callable[[str, str], None]
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(error: DaggyrError) -> grpc.StatusCode:
    """The grpc.StatusCode of one of the project's exceptions."""
    return _CODES.get(error.code, grpc.StatusCode.UNKNOWN)


def _parse(rpc: Rpc, data: bytes) -> message.Message:
    request = rpc.request()
    try:
        request.ParseFromString(data)
    except message.DecodeError:
        raise InvalidArgument(
            f"request is not a valid {request.DESCRIPTOR.full_name} message"
        ) from None
    return request


@contextlib.asynccontextmanager
async def _converted(
    rpc: Rpc, context: grpc.aio.ServicerContext, observe: RequestObserver | None
) -> AsyncIterator[None]:
    """Turn the project's exceptions into gRPC statuses, and count the call."""
    code = "OK"
    try:
        yield
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except DaggyrError as exc:
        code = exc.code_name
        await context.abort(grpc_code(exc), exc.message)
    except Exception:
        code = "INTERNAL"
        logger.exception("gRPC %s failed", rpc.name)
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error: see the runner's log"
        )
    finally:
        if observe is not None:
            observe(rpc.name, code)


def _unary(
    rpc: Rpc, call: Callable[[Any], Any], observe: RequestObserver | None
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        async with _converted(rpc, context, observe):
            return await call(_parse(rpc, data))

    return handle


def _streaming(
    rpc: Rpc, call: Callable[[Any], Any], observe: RequestObserver | None
) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def handle(
        data: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async with _converted(rpc, context, observe):
            async for item in call(_parse(rpc, data)):
                yield item

    return handle


def runner_handler(
    servicer: object, observe: RequestObserver | None = None
) -> grpc.GenericRpcHandler:
    """Every method of daggyr.v1.Runner bound to ``servicer``."""
    handlers = {}
    for rpc in rpcs():
        call = getattr(servicer, rpc.name)
        if rpc.server_streaming:
            handlers[rpc.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(rpc, call, observe),
                response_serializer=rpc.response.SerializeToString,
            )
        else:
            handlers[rpc.name] = grpc.unary_unary_rpc_method_handler(
                _unary(rpc, call, observe),
                response_serializer=rpc.response.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def add_services(
    server: grpc.aio.Server,
    servicer: object,
    observe: RequestObserver | None = None,
    extra_names: Sequence[str] = (),
) -> health.aio.HealthServicer:
    """Register the runner, health and reflection services; returns health."""
    server.add_generic_rpc_handlers((runner_handler(servicer, observe),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        SERVICE.full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        *extra_names,
    )
    reflection.enable_server_reflection(names, server)
    return health_servicer
