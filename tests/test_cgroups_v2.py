"""cgroup v2: for real on this host's cgroup2 mount, limits on a fixture tree."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daggyr.cgroups import AppliedLimits, CgroupError, V2CgroupManager, V2TaskCgroup
from daggyr.cgroups.task import kill_each

from .cgroup_helpers import (
    Children,
    FixtureFs,
    cgroup_mounts_of,
    check_kill_reaches_escaped_descendants,
    leftover_dirs,
    unique_name,
)

MIB = 1 << 20


@pytest.fixture(autouse=True, scope="module")
def _no_cgroup_left() -> Iterator[None]:
    yield
    assert leftover_dirs() == []


@pytest.fixture
def children() -> Iterator[Children]:
    started = Children()
    yield started
    started.close()


# --- for real, on the cgroup2 mount (controller-less here: no limits) ---


@pytest.fixture
def real() -> Iterator[V2CgroupManager]:
    """A manager on the host's cgroup2 mount, told no controllers are enabled."""
    if os.geteuid() != 0:
        pytest.skip("cgroup v2 tests need root to create cgroups")
    mounts = cgroup_mounts_of("cgroup2")
    if not mounts:
        pytest.skip("no cgroup2 filesystem mounted")
    root_name = unique_name("v2")
    manager = V2CgroupManager(mounts[0], root_name, controllers=())
    assert manager.setup() == []
    yield manager
    V2CgroupManager(mounts[0], root_name, controllers=()).setup()
    manager.teardown()
    assert not os.path.exists(manager.root_paths[0])


def _read(cgroup_dir: str, name: str) -> str:
    return Path(cgroup_dir, name).read_text().strip()


def _events(cg: V2TaskCgroup) -> dict[str, str]:
    return dict(line.split() for line in _read(cg.path, "cgroup.events").splitlines())


async def test_real_join_cpu_accounting_and_remove(
    real: V2CgroupManager, children: Children
) -> None:
    cg = real.create("join", 0.5, 64, 50)

    assert cg.path == os.path.join(real.root_paths[0], "join")
    assert cg.paths == (cg.path,)
    assert cg.procs_files == (os.path.join(cg.path, "cgroup.procs"),)
    assert cg.notes == [
        "no cpu controller: cpu not limited",
        "no memory controller: memory not limited",
        "no pids controller: number of processes not limited",
    ]
    assert not cg.needs_sampling
    with pytest.raises(CgroupError, match=r"cpu\.max"):
        cg.limits()

    spin = "import time\nwhile time.process_time() < 0.3: pass"
    proc = children.start(cg, [sys.executable, "-c", spin])
    assert proc.wait(timeout=30) == 0
    usage = cg.usage()
    print(f"v2 (no controllers) 0.3 s spin: {usage}")
    assert usage.cpu_seconds >= 0.3
    assert usage.oom_kills == 0
    assert "no memory controller: peak memory not measured" in usage.notes

    assert await cg.wait_empty(1)
    await cg.remove()
    await cg.remove()  # idempotent
    assert not os.path.exists(cg.path)


async def test_real_freeze_while_signalling_then_thaw(
    real: V2CgroupManager,
    children: Children,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cg = real.create("usr1", 1, 64, 50)
    script = (
        "exec 2>&-; trap 'echo got >> got.txt' USR1; : > ready; "
        "while :; do sleep 0.05; done"
    )
    children.start(cg, ["sh", "-c", script], cwd=tmp_path)
    # Signal only once the trap is in place, or USR1 would end the shell.
    deadline = time.monotonic() + 5
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    seen: list[str] = []

    def spy(pids: list[int], sig: int) -> int:
        seen.append(_events(cg)["frozen"])
        return kill_each(pids, sig)

    monkeypatch.setattr("daggyr.cgroups.v2.kill_each", spy)
    assert cg.signal_all(signal.SIGUSR1) >= 1

    assert seen == ["1"]
    assert _read(cg.path, "cgroup.freeze") == "0"
    got = tmp_path / "got.txt"
    deadline = time.monotonic() + 5
    # The file exists as soon as the shell opens it; its line follows.
    while not (got.exists() and got.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got.read_text() == "got\n"
    assert _events(cg)["frozen"] == "0"
    assert not cg.is_empty()

    assert cg.signal_all(signal.SIGKILL) >= 1
    assert seen == ["1"]  # SIGKILL went through cgroup.kill, not pid by pid
    assert await cg.wait_empty(2)
    await cg.remove()


async def test_real_kill_reaches_a_setsid_descendant_ignoring_sigterm(
    real: V2CgroupManager, children: Children, tmp_path: Path
) -> None:
    cg = real.create("escape", 1, 64, 50)
    await check_kill_reaches_escaped_descendants(cg, children, tmp_path)
    await cg.remove()
    assert not os.path.exists(cg.path)


async def test_real_setup_kills_and_removes_leftovers(
    real: V2CgroupManager, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    cg = real.create("left", 1, 64, 50)
    inner = os.path.join(cg.path, "inner")
    os.mkdir(inner)
    proc = children.start(
        cg, ["sleep", "300"], procs_files=[os.path.join(inner, "cgroup.procs")]
    )
    real.teardown()  # a task cgroup is left: the root stays
    assert os.path.isdir(real.root_paths[0])

    mount = os.path.dirname(real.root_paths[0])
    again = V2CgroupManager(mount, os.path.basename(real.root_paths[0]), controllers=())
    with caplog.at_level(logging.INFO, logger="daggyr.cgroups"):
        lines = again.setup()

    assert lines == [f"cleaned leftover cgroup {cg.path} (killed 1 processes)"]
    assert lines[0] in caplog.messages
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert not os.path.exists(cg.path)


# --- limits and accounting, on a fixture tree ---


def _fixture(
    tmp_path: Path, *, omit: tuple[str, ...] = (), fail_on: str = ""
) -> tuple[Path, FixtureFs]:
    """A fake cgroup2 mount whose directories get the v2-files template."""
    fs = FixtureFs("v2-files", omit=omit, fail_on=fail_on)
    mount = tmp_path / "cgroup"
    mount.mkdir()
    fs.populate(mount)
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    return mount, fs


def test_fixture_setup_enables_controllers(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path)
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)

    assert manager.setup() == []

    root = mount / "daggyr"
    assert manager.root_paths == (str(root),)
    assert _read(str(mount), "cgroup.subtree_control") == "+cpu +memory +pids"
    assert _read(str(root), "cgroup.subtree_control") == "+cpu +memory +pids"
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (mount / "cgroup.subtree_control").write_text("cpuset cpu io memory pids\n")
    manager.setup()  # already enabled: nothing written
    assert _read(str(root), "cgroup.subtree_control") == "cpu memory pids"
    manager.teardown()
    assert not root.exists()


def test_fixture_absolute_root_enables_each_level(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path)
    (mount / "service").mkdir()
    fs.populate(mount / "service")
    (mount / "service" / "cgroup.subtree_control").write_text("memory\n")
    root = mount / "service" / "tasks"

    manager = V2CgroupManager(str(mount), str(root), fs=fs)
    manager.setup()

    assert manager.root_paths == (str(root),)
    assert _read(str(mount), "cgroup.subtree_control") == "+cpu +memory +pids"
    assert _read(str(mount / "service"), "cgroup.subtree_control") == "+cpu +pids"
    with pytest.raises(CgroupError, match="not below the mount"):
        V2CgroupManager(str(mount), str(tmp_path / "elsewhere"), fs=fs)


async def test_fixture_create_writes_limits_and_reads_them_back(
    tmp_path: Path,
) -> None:
    mount, fs = _fixture(tmp_path)
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()

    cg = manager.create("t", 0.5, 64, 50)

    assert _read(cg.path, "cpu.max") == "50000 100000"
    assert _read(cg.path, "memory.max") == str(64 * MIB)
    assert _read(cg.path, "memory.swap.max") == "0"
    assert _read(cg.path, "pids.max") == "50"
    assert cg.limits() == AppliedLimits(cores=0.5, memory_mb=64, pids=50)
    assert cg.notes == [
        "cpu quota 50000us/100000us (0.5 cores)",
        "memory limit 64 MiB, swap 0",
        "pids limit 50",
    ]
    big = manager.create("big", 64, 1024, 4096)  # more cores than the host: fine
    assert _read(big.path, "cpu.max") == "6400000 100000"
    await cg.remove()
    await big.remove()
    manager.teardown()
    assert not mount.joinpath("daggyr").exists()


@pytest.mark.parametrize("cores", [0.005, 0.0001])
def test_fixture_tiny_cores(tmp_path: Path, cores: float) -> None:
    mount, fs = _fixture(tmp_path)
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()

    cg = manager.create("t", cores, 64, 50)

    assert _read(cg.path, "cpu.max") == "1000 100000"
    assert cg.limits().cores == 0.01
    assert "raised to the kernel minimum of 1000us" in cg.notes[0]
    assert f"{cores:g} requested" in cg.notes[0]


def test_fixture_without_swap_file_says_swap_is_not_limited(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path, omit=("memory.swap.max",))
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()

    cg = manager.create("t", 1, 64, 50)

    assert cg.notes[1] == (
        "memory limit 64 MiB; memory.swap.max not available on this kernel: "
        "swap not limited"
    )


def test_fixture_failed_write_removes_the_cgroup(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path, fail_on="memory.max")
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()

    with pytest.raises(CgroupError, match=r"memory\.max: Invalid argument"):
        manager.create("t", 1, 64, 50)

    assert not (mount / "daggyr" / "t").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_fixture_bad_names(tmp_path: Path, name: str) -> None:
    mount, fs = _fixture(tmp_path)
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()

    with pytest.raises(CgroupError, match="not a single path component"):
        manager.create(name, 1, 64, 50)


def test_fixture_usage_with_memory_peak(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path)
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()
    cg = manager.create("t", 1, 64, 50)
    task = Path(cg.path)
    (task / "memory.peak").write_text(f"{310 * MIB}\n")
    (task / "cpu.stat").write_text(
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"
        "nr_periods 40\nnr_throttled 7\nthrottled_usec 250000\n"
        "nr_bursts 0\nburst_usec 0\n"
    )
    # Reclaim at the limit ("max", "high") is not an OOM kill.
    (task / "memory.events").write_text(
        "low 0\nhigh 12\nmax 4711\noom 0\noom_kill 0\noom_group_kill 0\n"
    )

    assert not cg.needs_sampling
    usage = cg.usage()
    assert usage.peak_memory_mb == 310
    assert (usage.cpu_seconds, usage.throttled_seconds) == (1.5, 0.25)
    assert usage.oom_kills == 0
    assert usage.notes == ()

    (task / "memory.events").write_text(
        "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\noom_group_kill 0\n"
    )
    assert cg.usage().oom_kills == 1


def test_fixture_without_memory_peak_samples_memory_current(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path, omit=("memory.peak",))
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()
    cg = manager.create("t", 1, 1024, 50)
    current = Path(cg.path, "memory.current")

    assert cg.needs_sampling
    for mb in (10, 300, 120):
        current.write_text(f"{mb * MIB}\n")
        cg.sample()
    current.write_text(f"{5 * MIB}\n")

    usage = cg.usage()
    assert usage.peak_memory_mb == 300
    assert usage.notes == (
        "peak memory sampled from memory.current (kernel has no memory.peak)",
    )


def test_fixture_setup_removes_leftovers(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path)
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()
    manager.create("old-1", 1, 64, 50)
    manager.create("old-2", 1, 64, 50)

    lines = V2CgroupManager(str(mount), "daggyr", fs=fs).setup()

    root = mount / "daggyr"
    assert lines == [
        f"cleaned leftover cgroup {root / 'old-1'} (killed 0 processes)",
        f"cleaned leftover cgroup {root / 'old-2'} (killed 0 processes)",
    ]
    assert [p.name for p in root.iterdir() if p.is_dir()] == []


def test_fixture_controllers_read_from_the_mount(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path)
    (mount / "cgroup.controllers").write_text("cpu io\n")
    manager = V2CgroupManager(str(mount), "daggyr", fs=fs)
    manager.setup()

    cg = manager.create("t", 2, 64, 50)

    assert _read(cg.path, "cpu.max") == "200000 100000"
    assert _read(cg.path, "memory.max") == "max"
    assert cg.notes[1:] == [
        "no memory controller: memory not limited",
        "no pids controller: number of processes not limited",
    ]


def test_own_limits_lowest_along_the_path(tmp_path: Path) -> None:
    mount, fs = _fixture(tmp_path)
    layout = {
        "cpu.max": "max 100000",
        "a/cpu.max": "150000 100000",
        "a/memory.max": str(8192 * MIB),
        "a/b/cpu.max": "max 100000",
        "a/b/memory.max": "max",
        "a/b/c/cpu.max": "400000 100000",
        "a/b/c/memory.max": str(16384 * MIB),
    }
    for name, text in layout.items():
        (mount / name).parent.mkdir(parents=True, exist_ok=True)
        (mount / name).write_text(text + "\n")
    own = tmp_path / "self-cgroup"
    own.write_text("0::/a/b/c\n")

    manager = V2CgroupManager(str(mount), "daggyr", fs=fs, proc_self_cgroup=str(own))

    assert manager.own_limits() == (1.5, 8192)
    own.write_text("0::/\n")
    assert manager.own_limits() == (None, None)
    own.write_text("12:memory:/x\n")  # no unified line: nothing to read
    assert manager.own_limits() == (None, None)
