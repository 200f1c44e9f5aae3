import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[State]
    QUEUED: _ClassVar[State]
    RUNNING: _ClassVar[State]
    SUCCEEDED: _ClassVar[State]
    FAILED: _ClassVar[State]
    CANCELLED: _ClassVar[State]
    TIMED_OUT: _ClassVar[State]
    OUT_OF_MEMORY: _ClassVar[State]
    SYSTEM_ERROR: _ClassVar[State]
STATE_UNSPECIFIED: State
QUEUED: State
RUNNING: State
SUCCEEDED: State
FAILED: State
CANCELLED: State
TIMED_OUT: State
OUT_OF_MEMORY: State
SYSTEM_ERROR: State

class Capacity(_message.Message):
    __slots__ = ("cores", "memory_mb")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    cores: float
    memory_mb: int
    def __init__(self, cores: _Optional[float] = ..., memory_mb: _Optional[int] = ...) -> None: ...

class CapacityReport(_message.Message):
    __slots__ = ("total", "free", "running_tasks", "queued_tasks", "enforcement", "enforcement_reason")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASKS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TASKS_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_REASON_FIELD_NUMBER: _ClassVar[int]
    total: Capacity
    free: Capacity
    running_tasks: int
    queued_tasks: int
    enforcement: str
    enforcement_reason: str
    def __init__(self, total: _Optional[_Union[Capacity, _Mapping]] = ..., free: _Optional[_Union[Capacity, _Mapping]] = ..., running_tasks: _Optional[int] = ..., queued_tasks: _Optional[int] = ..., enforcement: _Optional[str] = ..., enforcement_reason: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("command", "environment", "cores", "memory_mb", "timeout_seconds", "working_directory")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    command: _containers.RepeatedScalarFieldContainer[str]
    environment: _containers.ScalarMap[str, str]
    cores: float
    memory_mb: int
    timeout_seconds: int
    working_directory: str
    def __init__(self, command: _Optional[_Iterable[str]] = ..., environment: _Optional[_Mapping[str, str]] = ..., cores: _Optional[float] = ..., memory_mb: _Optional[int] = ..., timeout_seconds: _Optional[int] = ..., working_directory: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("cores", "memory_mb", "pids")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    cores: float
    memory_mb: int
    pids: int
    def __init__(self, cores: _Optional[float] = ..., memory_mb: _Optional[int] = ..., pids: _Optional[int] = ...) -> None: ...

class TaskAttempt(_message.Message):
    __slots__ = ("task_id", "state", "start_time", "stop_time", "exit_code", "signal", "output_log", "error_log", "output_truncated", "executor_log", "peak_memory_mb", "cpu_seconds", "throttled_seconds", "oom_killed", "limits", "expire_time", "submit_time", "task")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LOG_FIELD_NUMBER: _ClassVar[int]
    ERROR_LOG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_LOG_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: State
    start_time: _timestamp_pb2.Timestamp
    stop_time: _timestamp_pb2.Timestamp
    exit_code: int
    signal: int
    output_log: str
    error_log: str
    output_truncated: bool
    executor_log: str
    peak_memory_mb: float
    cpu_seconds: float
    throttled_seconds: float
    oom_killed: bool
    limits: Limits
    expire_time: _timestamp_pb2.Timestamp
    submit_time: _timestamp_pb2.Timestamp
    task: Task
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stop_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., output_log: _Optional[str] = ..., error_log: _Optional[str] = ..., output_truncated: _Optional[bool] = ..., executor_log: _Optional[str] = ..., peak_memory_mb: _Optional[float] = ..., cpu_seconds: _Optional[float] = ..., throttled_seconds: _Optional[float] = ..., oom_killed: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...
