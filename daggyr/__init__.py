"""daggyr: a remote task executor that runs each task in its own cgroup.

What clients use is exported here: the client and the runner pool, the task
messages, and the exceptions every call may raise.
"""

from daggyr.client import Client
from daggyr.errors import (
    AlreadyExists,
    DaggyrError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from daggyr.pool import NoRunnerFits, RunnerPool, RunnerVanished, choose
from daggyr.v1.task_pb2 import Capacity, CapacityReport, State, Task, TaskAttempt

__all__ = [
    "AlreadyExists",
    "Capacity",
    "CapacityReport",
    "Client",
    "DaggyrError",
    "FailedPrecondition",
    "InvalidArgument",
    "NoRunnerFits",
    "NotFound",
    "OutOfRange",
    "ResourceExhausted",
    "RunnerPool",
    "RunnerVanished",
    "State",
    "Task",
    "TaskAttempt",
    "Unauthenticated",
    "Unavailable",
    "choose",
]
