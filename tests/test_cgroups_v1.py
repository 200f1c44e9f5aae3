"""cgroup v1 for real on this host's hierarchies, plus a co-mounted fixture tree."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daggyr.cgroups import (
    AppliedLimits,
    CgroupError,
    V1CgroupManager,
    V1TaskCgroup,
    detect,
)
from daggyr.cgroups.detect import parse_mountinfo
from daggyr.cgroups.task import kill_each

from .cgroup_helpers import (
    Children,
    FixtureFs,
    check_kill_reaches_escaped_descendants,
    leftover_dirs,
    unique_name,
)

MIB = 1 << 20
# Every process forks for ever, retrying when the kernel refuses.
BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.fixture(autouse=True, scope="module")
def _no_cgroup_left() -> Iterator[None]:
    yield
    assert leftover_dirs() == []


@pytest.fixture
def root_name() -> str:
    return unique_name("v1")


@pytest.fixture
def manager(root_name: str) -> Iterator[V1CgroupManager]:
    """A v1 manager on this host's real hierarchies, cleaned up like a restart."""
    if os.geteuid() != 0:
        pytest.skip("cgroup v1 tests need root to create cgroups")
    found = detect(root_name)
    if not isinstance(found, V1CgroupManager):
        pytest.skip(f"no writable cgroup v1 hierarchies here ({found.reason})")
    assert found.setup() == []
    yield found
    # A second runner on the same root kills and removes whatever is left.
    detect(root_name).setup()
    found.teardown()
    assert [p for p in found.root_paths if os.path.exists(p)] == []


@pytest.fixture
def children() -> Iterator[Children]:
    started = Children()
    yield started
    started.close()


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A fresh directory on a disk-backed filesystem (page cache, not shmem)."""
    path = Path(tempfile.mkdtemp(prefix="daggyr-cgtest-", dir="/var/tmp"))
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    mount = max(
        (m for m in mounts if str(path).startswith(m.point.rstrip("/") + "/")),
        key=lambda m: len(m.point),
    )
    if mount.fstype in ("tmpfs", "ramfs"):
        shutil.rmtree(path)
        pytest.skip(f"/var/tmp is {mount.fstype}: files there are not page cache")
    yield path
    shutil.rmtree(path)


def _task_dirs(manager: V1CgroupManager) -> list[str]:
    """Every directory under the manager's roots."""
    return [str(p) for root in manager.root_paths for p in Path(root).glob("*/")]


def _read(cgroup_dir: str, name: str) -> str:
    return Path(cgroup_dir, name).read_text().strip()


async def test_child_joins_every_hierarchy_and_limits_read_back(
    manager: V1CgroupManager, children: Children
) -> None:
    cg = manager.create("join", 0.5, 64, 50)

    assert cg.path == os.path.join(manager.root_paths[0], "join")
    assert "/memory/" in cg.path
    assert len(cg.paths) == len(set(cg.paths)) == len(manager.root_paths)
    assert cg.procs_files == tuple(os.path.join(p, "cgroup.procs") for p in cg.paths)
    assert cg.notes == [
        "cpu quota 50000us/100000us (0.5 cores)",
        "memory limit 64 MiB, swap 0",
        "pids limit 50",
    ]
    assert cg.limits() == AppliedLimits(cores=0.5, memory_mb=64, pids=50)
    memory_dir = cg.path
    assert _read(memory_dir, "memory.memsw.limit_in_bytes") == str(64 * MIB)
    assert not cg.needs_sampling

    proc = children.start(cg, ["sleep", "30"])
    assert cg.pids() == [proc.pid]
    for procs in cg.procs_files:
        assert Path(procs).read_text().split() == [str(proc.pid)]
    assert not cg.is_empty()

    proc.kill()
    proc.wait()
    assert await cg.wait_empty(2)
    await cg.remove()
    await cg.remove()  # idempotent
    assert [p for p in cg.paths if os.path.exists(p)] == []


@pytest.mark.parametrize("cores", [0.005, 0.0001])
async def test_tiny_cores_raised_to_the_kernel_minimum(
    manager: V1CgroupManager, cores: float
) -> None:
    cg = manager.create("tiny", cores, 64, 50)

    cpu_dir = next(p for p in cg.paths if "/cpu/" in p or "/cpu," in p)
    assert _read(cpu_dir, "cpu.cfs_quota_us") == "1000"
    assert _read(cpu_dir, "cpu.cfs_period_us") == "100000"
    assert cg.limits().cores == 0.01 >= cores
    assert cg.notes[0] == (
        f"cpu quota 1000us/100000us (0.01 cores; {cores:g} requested, "
        "raised to the kernel minimum of 1000us)"
    )
    await cg.remove()


def test_failed_write_leaves_no_cgroup(manager: V1CgroupManager) -> None:
    # A quota this large is past the kernel's maximum: EINVAL on the last dir.
    with pytest.raises(CgroupError, match=r"cpu\.cfs_quota_us: Invalid argument"):
        manager.create("huge", 1e9, 64, 50)

    assert _task_dirs(manager) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape"])
def test_bad_names_are_refused_before_anything_is_made(
    manager: V1CgroupManager, name: str
) -> None:
    with pytest.raises(CgroupError, match="not a single path component"):
        manager.create(name, 1, 64, 50)

    assert _task_dirs(manager) == []


async def test_existing_name_is_an_error_and_left_alone(
    manager: V1CgroupManager,
) -> None:
    first = manager.create("twice", 1, 64, 50)

    with pytest.raises(CgroupError, match="already exists"):
        manager.create("twice", 2, 128, 60)

    assert all(os.path.isdir(p) for p in first.paths)
    assert first.limits() == AppliedLimits(1.0, 64, 50)
    await first.remove()


async def test_oom_kill_is_counted(
    manager: V1CgroupManager, children: Children
) -> None:
    cg = manager.create("oom", 1, 64, 50)

    touch = "x = b'x' * (256 << 20)"
    proc = children.start(cg, [sys.executable, "-c", touch])

    assert proc.wait(timeout=60) == -signal.SIGKILL
    usage = cg.usage()
    assert usage.oom_kills >= 1
    assert usage.peak_memory_mb <= 64
    assert await cg.wait_empty(2)
    await cg.remove()


async def test_page_cache_at_the_limit_is_not_an_oom(
    manager: V1CgroupManager, children: Children, disk_dir: Path
) -> None:
    write = manager.create("write", 1, 64, 50)
    dd = ["dd", "if=/dev/zero", "of=big.bin", "bs=1M", "count=256", "conv=fsync"]
    proc = children.start(write, [*dd, "status=none"], cwd=disk_dir)
    assert proc.wait(timeout=60) == 0
    usage = write.usage()
    assert (disk_dir / "big.bin").stat().st_size == 256 * MIB
    assert usage.oom_kills == 0
    # Cache was charged up to the limit and reclaimed there: still no OOM.
    assert 60 <= usage.peak_memory_mb <= 65
    await write.remove()

    read = manager.create("read", 1, 64, 50)
    cat = ["sh", "-c", "cat big.bin big.bin > /dev/null"]
    proc = children.start(read, cat, cwd=disk_dir)
    assert proc.wait(timeout=60) == 0
    assert read.usage().oom_kills == 0
    await read.remove()


async def test_cpu_quota_holds_a_busy_loop_to_half_a_core(
    manager: V1CgroupManager, children: Children
) -> None:
    cg = manager.create("busy", 0.5, 256, 50)
    spin = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"

    proc = children.start(cg, [sys.executable, "-c", spin])

    assert proc.wait(timeout=30) == 0
    usage = cg.usage()
    print(f"v1 busy 3 s at 0.5 cores: {usage}")
    assert 1.2 <= usage.cpu_seconds <= 1.8
    assert usage.throttled_seconds > 0
    assert usage.oom_kills == 0
    await cg.remove()


async def test_peak_memory_from_the_kernel(
    manager: V1CgroupManager, children: Children
) -> None:
    cg = manager.create("peak", 1, 512, 50)
    hold = "import time; x = b'x' * (100 << 20); time.sleep(0.3)"

    proc = children.start(cg, [sys.executable, "-c", hold])

    assert proc.wait(timeout=30) == 0
    usage = cg.usage()
    print(f"v1 100 MiB held: {usage}")
    assert 85 <= usage.peak_memory_mb <= 115
    assert usage.cpu_seconds > 0
    assert usage.oom_kills == 0
    await cg.remove()


async def test_fork_bomb_is_contained_and_killed_in_one_pass(
    manager: V1CgroupManager, children: Children
) -> None:
    cg = manager.create("bomb", 0.5, 512, 50)
    pids_dir = next(p for p in cg.paths if "/pids/" in p)

    children.start(cg, [sys.executable, "-c", BOMB])
    deadline = time.monotonic() + 2
    most = 0
    while time.monotonic() < deadline:
        most = max(most, int(_read(pids_dir, "pids.current")))
        time.sleep(0.02)

    assert 40 <= most <= 50
    events = dict(line.split() for line in _read(pids_dir, "pids.events").splitlines())
    assert int(events["max"]) > 0  # forks were refused at the limit
    killed = cg.signal_all(signal.SIGKILL)
    started = time.monotonic()
    assert killed > 10
    assert await cg.wait_empty(5)
    print(
        f"v1 bomb: at most {most} pids, {killed} killed in one pass, "
        f"empty after {time.monotonic() - started:.3f} s"
    )
    assert _read(cg.paths[-1], "freezer.state") == "THAWED"
    await cg.remove()


async def test_kill_reaches_a_setsid_descendant_ignoring_sigterm(
    manager: V1CgroupManager, children: Children, tmp_path: Path
) -> None:
    cg = manager.create("escape", 1, 64, 50)
    await check_kill_reaches_escaped_descendants(cg, children, tmp_path)
    freezer = next(p for p in cg.paths if "/freezer/" in p)
    assert _read(freezer, "freezer.state") == "THAWED"
    await cg.remove()


async def test_signal_is_delivered_and_the_cgroup_thawed(
    manager: V1CgroupManager, children: Children, tmp_path: Path
) -> None:
    cg = manager.create("usr1", 1, 64, 50)
    script = "exec 2>&-; trap 'echo got >> got.txt' USR1; while :; do sleep 0.05; done"
    children.start(cg, ["sh", "-c", script], cwd=tmp_path)

    assert cg.signal_all(signal.SIGUSR1) >= 1

    got = tmp_path / "got.txt"
    deadline = time.monotonic() + 5
    while not got.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got.read_text() == "got\n"
    assert not cg.is_empty()
    freezer = next(p for p in cg.paths if "/freezer/" in p)
    assert _read(freezer, "freezer.state") == "THAWED"
    cg.signal_all(signal.SIGKILL)
    assert await cg.wait_empty(2)
    await cg.remove()


async def test_processes_are_frozen_while_signalled(
    manager: V1CgroupManager, children: Children, monkeypatch: pytest.MonkeyPatch
) -> None:
    cg = manager.create("frozen", 1, 64, 50)
    freezer = next(p for p in cg.paths if "/freezer/" in p)
    children.start(cg, ["sleep", "30"])
    seen: list[str] = []

    def spy(pids: list[int], sig: int) -> int:
        seen.append(_read(freezer, "freezer.state"))
        return kill_each(pids, sig)

    monkeypatch.setattr("daggyr.cgroups.v1.kill_each", spy)
    assert cg.signal_all(signal.SIGKILL) == 1

    assert seen == ["FROZEN"]
    assert _read(freezer, "freezer.state") == "THAWED"
    assert await cg.wait_empty(2)
    await cg.remove()


async def test_setup_kills_and_removes_leftovers(
    manager: V1CgroupManager,
    root_name: str,
    children: Children,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cg = manager.create("left", 1, 64, 50)
    # A task may have made a cgroup of its own inside: clean-up goes depth-first.
    inner = [os.path.join(p, "inner") for p in cg.paths]
    for directory in inner:
        os.mkdir(directory)
    procs = [os.path.join(d, "cgroup.procs") for d in inner]
    proc = children.start(cg, ["sleep", "300"], procs_files=procs)
    manager.teardown()  # roots still hold a task cgroup: left in place
    assert all(os.path.isdir(p) for p in manager.root_paths)

    with caplog.at_level(logging.INFO, logger="daggyr.cgroups"):
        lines = detect(root_name).setup()

    assert lines == [f"cleaned leftover cgroup {cg.path} (killed 1 processes)"]
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert [p for p in cg.paths if os.path.exists(p)] == []
    assert all(os.path.isdir(p) for p in manager.root_paths)
    assert lines[0] in caplog.messages


async def test_co_mounted_cpu_cpuacct_share_one_directory(tmp_path: Path) -> None:
    mounts = {c: str(tmp_path / c) for c in ("memory", "pids", "freezer")}
    mounts["cpu"] = mounts["cpuacct"] = str(tmp_path / "cpu,cpuacct")
    for point in set(mounts.values()):
        os.mkdir(point)
    manager = V1CgroupManager(mounts, "daggyr", fs=FixtureFs("v1-files"))

    assert manager.setup() == []
    cg = manager.create("t", 1.5, 100, 30)

    assert len(manager.root_paths) == len(cg.paths) == len(cg.procs_files) == 4
    shared = os.path.join(mounts["cpu"], "daggyr", "t")
    assert cg.paths.count(shared) == 1
    assert _read(shared, "cpu.cfs_quota_us") == "150000"
    Path(shared, "cpuacct.usage").write_text("2500000000\n")
    assert cg.usage().cpu_seconds == 2.5
    assert cg.limits() == AppliedLimits(1.5, 100, 30)
    await cg.remove()
    manager.teardown()
    assert [p for p in manager.root_paths if os.path.exists(p)] == []


def test_fixture_usage_counts_only_oom_kill(tmp_path: Path) -> None:
    fs = FixtureFs("v1-files", omit={"memory.memsw.limit_in_bytes"})
    mounts = {c: str(tmp_path) for c in ("memory", "cpu", "cpuacct", "pids", "freezer")}
    cg = V1CgroupManager(mounts, "daggyr", fs=fs)
    cg.setup()
    task = cg.create("t", 1, 64, 50)
    assert isinstance(task, V1TaskCgroup)
    assert task.notes[1] == (
        "memory limit 64 MiB; memsw not available on this kernel: swap not limited"
    )
    memory = Path(task.path)
    (memory / "memory.failcnt").write_text("4711\n")
    (memory / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 1\noom_kill 0\n"
    )
    (memory / "memory.max_usage_in_bytes").write_text(f"{63 * MIB}\n")
    (memory / "cpu.stat").write_text(
        "nr_periods 30\nnr_throttled 12\nthrottled_time 750000000\n"
    )
    usage = task.usage()
    assert (usage.oom_kills, usage.peak_memory_mb) == (0, 63)
    assert usage.throttled_seconds == 0.75

    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert task.usage().notes == (
        "memory.oom_control has no oom_kill: OOM kills not counted",
    )


def test_own_limits_lowest_along_the_path(tmp_path: Path) -> None:
    mounts = {c: str(tmp_path / c) for c in ("memory", "cpu", "cpuacct", "pids")}
    mounts["freezer"] = str(tmp_path / "freezer")
    layout = {
        "cpu/a/cpu.cfs_quota_us": "300000",
        "cpu/a/cpu.cfs_period_us": "100000",
        "cpu/a/b/cpu.cfs_quota_us": "-1",
        "cpu/a/b/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": "9223372036854771712",
        "memory/x/memory.limit_in_bytes": str(2048 * MIB),
        "memory/x/y/memory.limit_in_bytes": str(4096 * MIB),
    }
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    own = tmp_path / "self-cgroup"
    own.write_text("4:memory:/x/y\n3:pids:/\n2:cpu,cpuacct:/a/b\n1:name=systemd:/\n")

    manager = V1CgroupManager(mounts, "daggyr", proc_self_cgroup=str(own))

    assert manager.own_limits() == (3.0, 2048)
    own.write_text("4:memory:/\n2:cpu,cpuacct:/\n")
    assert manager.own_limits() == (None, None)
