"""detect(): which back-end a host offers, on this host and on fixture mountinfo."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import daggyr.cgroups
from daggyr.cgroups import (
    CgroupError,
    NoneCgroupManager,
    V1CgroupManager,
    V2CgroupManager,
    detect,
)
from daggyr.cgroups.detect import parse_mountinfo

from .cgroup_helpers import (
    FIXTURES,
    FixtureFs,
    cgroup_mounts_of,
    leftover_dirs,
    mountinfo_fixture,
    unique_name,
)


@pytest.fixture(autouse=True, scope="module")
def _no_cgroup_left() -> Iterator[None]:
    yield
    assert leftover_dirs() == []


def test_package_exports() -> None:
    assert sorted(daggyr.cgroups.__all__) == [
        "AppliedLimits",
        "CgroupError",
        "CgroupFs",
        "CgroupManager",
        "NoneCgroupManager",
        "TaskCgroup",
        "Usage",
        "V1CgroupManager",
        "V1TaskCgroup",
        "V2CgroupManager",
        "V2TaskCgroup",
        "detect",
    ]


def test_this_host_is_cgroup_v1() -> None:
    """This host: v1 hierarchies, plus a cgroup2 mount without controllers."""
    if os.geteuid() != 0:
        pytest.skip("needs root to find cgroups writable")
    unified = cgroup_mounts_of("cgroup2")
    if not cgroup_mounts_of("cgroup") or not unified:
        pytest.skip("not a hybrid cgroup v1 host")
    name = unique_name("detect")

    manager = detect(name)

    assert isinstance(manager, V1CgroupManager)
    assert (manager.mode, manager.reason) == ("cgroup-v1", "")
    assert all(os.path.basename(p) == name for p in manager.root_paths)
    assert len(manager.root_paths) == len(set(manager.root_paths)) >= 4
    assert not any(os.path.exists(p) for p in manager.root_paths)  # nothing made


def _v2_tree(tmp_path: Path, controllers: str) -> Path:
    mount = tmp_path / "cgroup"
    mount.mkdir()
    FixtureFs("v2-files").populate(mount)
    (mount / "cgroup.controllers").write_text(controllers + "\n")
    return mount


def test_pure_v2_host(tmp_path: Path) -> None:
    mount = _v2_tree(tmp_path, "cpuset cpu io memory hugetlb pids rdma misc")
    info = mountinfo_fixture("mountinfo-v2", tmp_path, tmp_path / "mountinfo")

    manager = detect("daggyr", mountinfo=info)

    assert isinstance(manager, V2CgroupManager)
    assert (manager.mode, manager.reason) == ("cgroup-v2", "")
    assert manager.root_paths == (str(mount / "daggyr"),)


def test_v2_absolute_root(tmp_path: Path) -> None:
    mount = _v2_tree(tmp_path, "cpu memory pids")
    (mount / "runner").mkdir()
    (mount / "runner" / "cgroup.controllers").write_text("cpu memory pids\n")
    info = mountinfo_fixture("mountinfo-v2", tmp_path, tmp_path / "mountinfo")

    manager = detect(str(mount / "runner" / "tasks"), mountinfo=info)

    assert manager.root_paths == (str(mount / "runner" / "tasks"),)
    outside = detect("/elsewhere/tasks", mountinfo=info)
    assert outside.mode == "none"
    assert "not below a cgroup2 mount" in outside.reason


def _v1_tree(root: Path, info: str) -> None:
    """Create every mount point the fixture mountinfo names under ``root``."""
    for mount in parse_mountinfo(Path(info).read_text()):
        if mount.point.startswith(str(root)) and mount.fstype.startswith("cgroup"):
            Path(mount.point).mkdir(parents=True, exist_ok=True)
            if mount.fstype == "cgroup2":
                Path(mount.point, "cgroup.controllers").write_text("\n")


def test_hybrid_host_picks_v1(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    info = mountinfo_fixture("mountinfo-hybrid", root, tmp_path / "mountinfo")
    _v1_tree(root, info)

    manager = detect("daggyr", mountinfo=info)

    assert isinstance(manager, V1CgroupManager)
    assert manager.root_paths == tuple(
        str(root / h / "daggyr")
        for h in ("memory", "cpu", "cpuacct", "pids", "freezer")
    )


def test_co_mounted_cpu_cpuacct_is_one_root(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    info = mountinfo_fixture("mountinfo-v1-comounted", root, tmp_path / "mountinfo")
    _v1_tree(root, info)

    manager = detect("daggyr", mountinfo=info)

    assert manager.mode == "cgroup-v1"
    assert manager.root_paths == tuple(
        str(root / h / "daggyr") for h in ("memory", "cpu,cpuacct", "pids", "freezer")
    )


def test_missing_hierarchy_gives_none_with_the_reason(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    info = mountinfo_fixture("mountinfo-no-memory", root, tmp_path / "mountinfo")
    _v1_tree(root, info)

    manager = detect("daggyr", mountinfo=info)

    assert isinstance(manager, NoneCgroupManager)
    assert manager.mode == "none"
    assert manager.reason == (
        f"no cpu, memory or pids controller in cgroup.controllers of {root}/unified; "
        "cgroup v1 hierarchy memory not mounted"
    )
    assert manager.setup() == []
    assert manager.create("t", 1, 64, 50) is None
    manager.teardown()


def test_require_turns_none_into_an_error(tmp_path: Path) -> None:
    info = mountinfo_fixture("mountinfo-no-cgroup", tmp_path, tmp_path / "mountinfo")

    assert detect(mountinfo=info).reason == f"no cgroup filesystem in {info}"
    with pytest.raises(CgroupError, match="required but unavailable: no cgroup"):
        detect(mountinfo=info, require=True)


def test_v1_cannot_take_an_absolute_root(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    info = mountinfo_fixture("mountinfo-hybrid", root, tmp_path / "mountinfo")
    _v1_tree(root, info)

    manager = detect(str(root / "unified" / "x"), mountinfo=info)

    assert manager.mode == "none"
    assert "which needs cgroup v2" in manager.reason


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_bad_root_name_is_a_configuration_error(name: str) -> None:
    with pytest.raises(CgroupError, match="cgroup root name"):
        detect(name)


def test_mountinfo_escapes() -> None:
    mounts = parse_mountinfo((FIXTURES / "mountinfo-v2").read_text())

    assert "/media/usb disk" in [m.point for m in mounts]
    assert [m.fstype for m in mounts].count("cgroup2") == 1


def test_not_root_is_none_with_the_reason() -> None:
    """As nobody (a forked child), nothing here is writable."""
    if os.geteuid() != 0:
        manager = detect()
        assert manager.mode == "none"
        assert "not root" in manager.reason
        return
    if not cgroup_mounts_of("cgroup", "cgroup2"):
        pytest.skip("no cgroup filesystem mounted")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running any teardown
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            found = detect(unique_name("nobody"))
            report = {"mode": found.mode, "reason": found.reason}
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert report["mode"] == "none"
    assert "not root, and /" in report["reason"]
    assert "is not writable" in report["reason"]
    print(f"as nobody: {report['reason']}")
