"""What the package root offers clients, and that every module declares __all__."""

from __future__ import annotations

import importlib
import pkgutil

import daggyr


def test_root_exports_what_clients_use() -> None:
    assert sorted(daggyr.__all__) == sorted(
        [
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
    )
    for name in daggyr.__all__:
        assert getattr(daggyr, name) is not None


def test_every_module_declares_all() -> None:
    missing = []
    for info in pkgutil.walk_packages(daggyr.__path__, "daggyr."):
        if info.name.startswith("daggyr.v1"):
            continue  # generated
        module = importlib.import_module(info.name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            missing.append(info.name)
            continue
        for name in exported:
            assert hasattr(module, name), f"{info.name}.__all__ names {name!r}"
    assert missing == []
