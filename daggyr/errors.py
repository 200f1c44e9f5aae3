"""The project's exceptions, one per gRPC status code, and their HTTP mapping.

Each class also inherits the builtin that fits, so callers that only know
Python's own exceptions still catch them sensibly. The servicer, the REST shim
and the client all convert through ``STATUS``: one table, both protocols.
"""

from __future__ import annotations

__all__ = [
    "STATUS",
    "AlreadyExists",
    "Cancelled",
    "DaggyrError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_for_code",
    "http_status_for_code",
]


class DaggyrError(Exception):
    """Root of every error daggyr raises on purpose; carries a gRPC code."""

    code = 2  # UNKNOWN
    code_name = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Cancelled(DaggyrError):
    code, code_name = 1, "CANCELLED"


class InvalidArgument(DaggyrError, ValueError):
    code, code_name = 3, "INVALID_ARGUMENT"


class DeadlineExceeded(DaggyrError, TimeoutError):
    code, code_name = 4, "DEADLINE_EXCEEDED"


class NotFound(DaggyrError, LookupError):
    code, code_name = 5, "NOT_FOUND"


class AlreadyExists(DaggyrError):
    code, code_name = 6, "ALREADY_EXISTS"


class PermissionDenied(DaggyrError, PermissionError):
    code, code_name = 7, "PERMISSION_DENIED"


class ResourceExhausted(DaggyrError):
    code, code_name = 8, "RESOURCE_EXHAUSTED"


class FailedPrecondition(DaggyrError):
    code, code_name = 9, "FAILED_PRECONDITION"


class OutOfRange(DaggyrError, ValueError):
    code, code_name = 11, "OUT_OF_RANGE"


class Unimplemented(DaggyrError, NotImplementedError):
    code, code_name = 12, "UNIMPLEMENTED"


class Internal(DaggyrError):
    code, code_name = 13, "INTERNAL"


class Unavailable(DaggyrError, ConnectionError):
    code, code_name = 14, "UNAVAILABLE"


class Unauthenticated(DaggyrError):
    code, code_name = 16, "UNAUTHENTICATED"


# gRPC code number -> (exception class, HTTP status), as grpc-gateway maps them.
STATUS: dict[int, tuple[type[DaggyrError], int]] = {
    1: (Cancelled, 499),
    2: (DaggyrError, 500),
    3: (InvalidArgument, 400),
    4: (DeadlineExceeded, 504),
    5: (NotFound, 404),
    6: (AlreadyExists, 409),
    7: (PermissionDenied, 403),
    8: (ResourceExhausted, 429),
    9: (FailedPrecondition, 400),
    10: (AlreadyExists, 409),  # ABORTED
    11: (OutOfRange, 400),
    12: (Unimplemented, 501),
    13: (Internal, 500),
    14: (Unavailable, 503),
    15: (Internal, 500),  # DATA_LOSS
    16: (Unauthenticated, 401),
}


def http_status_for_code(code: int) -> int:
    """The HTTP status grpc-gateway uses for a gRPC code number."""
    return STATUS.get(code, (DaggyrError, 500))[1]


def error_for_code(code: int, message: str) -> DaggyrError:
    """The most specific exception for a gRPC code number."""
    cls = STATUS.get(code, (DaggyrError, 500))[0]
    return cls(message)
