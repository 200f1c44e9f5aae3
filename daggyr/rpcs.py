"""The RPCs of daggyr.v1.Runner as read from the service descriptor.

Both servers are built from this one list, so an RPC added to the proto is
served on gRPC and, through its google.api.http rule, on REST, with no code
per RPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message, message_factory

from daggyr.v1 import runner_pb2

__all__ = ["SERVICE", "Rpc", "rpcs"]

SERVICE: descriptor.ServiceDescriptor = runner_pb2.DESCRIPTOR.services_by_name["Runner"]


@dataclass(frozen=True)
class Rpc:
    """One method: its name, message classes, streaming and HTTP rule."""

    name: str
    path: str  # the gRPC method path, /daggyr.v1.Runner/Name
    request: type[message.Message]
    response: type[message.Message]
    server_streaming: bool
    http: http_pb2.HttpRule | None


def rpcs(service: descriptor.ServiceDescriptor = SERVICE) -> list[Rpc]:
    """Every method of ``service``, in proto order."""
    found = []
    for method in service.methods:
        options: Any = method.GetOptions()
        rule = None
        if options.HasExtension(annotations_pb2.http):
            rule = options.Extensions[annotations_pb2.http]
        found.append(
            Rpc(
                name=method.name,
                path=f"/{service.full_name}/{method.name}",
                request=message_factory.GetMessageClass(method.input_type),
                response=message_factory.GetMessageClass(method.output_type),
                server_streaming=method.server_streaming,
                http=rule,
            )
        )
    return found
