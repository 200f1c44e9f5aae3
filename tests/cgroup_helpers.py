"""What the cgroup tests share: unique names, fixture trees, children that join."""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from daggyr.cgroups import CgroupError, CgroupFs, TaskCgroup
from daggyr.cgroups.detect import parse_mountinfo

__all__ = [
    "FIXTURES",
    "RUN_ID",
    "Children",
    "FixtureFs",
    "cgroup_mounts_of",
    "leftover_dirs",
    "mountinfo_fixture",
    "unique_name",
    "wait_until",
]

# Every cgroup these tests create is named after the run, so runs in parallel
# (and other suites using cgroups) never see each other's directories.
RUN_ID = f"daggyr-test-{os.getpid()}-{secrets.token_hex(3)}"
FIXTURES = Path(__file__).parent / "fixtures" / "cgroups"
_counter = itertools.count()

# Joins every cgroup named before "--", then execs the rest of argv: the
# same order of events as the executor's trampoline.
JOIN = (
    'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'
)


def unique_name(tag: str) -> str:
    """A cgroup root name no other test or run uses."""
    return f"{RUN_ID}-{tag}-{next(_counter)}"


def cgroup_mounts_of(*fstypes: str) -> list[str]:
    """The mount points of this host's filesystems of those types."""
    text = Path("/proc/self/mountinfo").read_text()
    return [m.point for m in parse_mountinfo(text) if m.fstype in fstypes]


def leftover_dirs() -> list[str]:
    """Directories of this run still present in any mounted hierarchy."""
    found: list[str] = []
    for mount in cgroup_mounts_of("cgroup", "cgroup2"):
        found += [str(p) for p in Path(mount).glob(RUN_ID + "*")]
    return found


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    """Poll ``predicate()`` every 10 ms until it is true or ``timeout`` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def mountinfo_fixture(name: str, root: Path, target: Path) -> str:
    """Write fixture mountinfo ``name`` with @ROOT@ replaced; return its path."""
    text = (FIXTURES / name).read_text().replace("@ROOT@", str(root))
    target.write_text(text)
    return str(target)


class Children:
    """Processes a test starts in a cgroup; whatever is left is killed at the end."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        cgroup: TaskCgroup,
        argv: Iterable[str],
        *,
        cwd: str | Path | None = None,
        procs_files: Iterable[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv inside ``cgroup``, joined before exec; wait until it is in."""
        join = cgroup.procs_files if procs_files is None else tuple(procs_files)
        proc = subprocess.Popen(
            ["/bin/sh", "-c", JOIN, "join", *join, "--", *argv],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
        self._procs.append(proc)
        joined = wait_until(
            lambda: proc.pid in cgroup.pids() or proc.poll() is not None
        )
        assert joined, f"pid {proc.pid} never joined {cgroup.path}"
        return proc

    def close(self) -> None:
        """Kill (by pid) and reap every child this object started."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


class FixtureFs(CgroupFs):
    """A plain directory tree standing in for cgroupfs.

    Each directory it creates gets a copy of a template's controller files,
    as the kernel would; rmdir refuses (EBUSY) while a sub-cgroup or a pid is
    left, and writes to ``fail_on`` fail with EINVAL.
    """

    def __init__(
        self, template: str, *, omit: Iterable[str] = (), fail_on: str = ""
    ) -> None:
        self.template = FIXTURES / template
        self.omit = set(omit)
        self.fail_on = fail_on

    def populate(self, path: str | Path) -> None:
        for source in self.template.iterdir():
            if source.name not in self.omit:
                shutil.copyfile(source, Path(path, source.name))

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        self.populate(path)

    def rmdir(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        procs = Path(path, "cgroup.procs")
        if self.subdirs(path) or (procs.exists() and procs.read_text().strip()):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        shutil.rmtree(path)

    def write(self, path: str, value: str) -> None:
        if self.fail_on and os.path.basename(path) == self.fail_on:
            raise CgroupError(f"write {value!r} to {path}: Invalid argument")
        super().write(path, value)


async def check_kill_reaches_escaped_descendants(
    cg: TaskCgroup, children: Children, tmp_path: Path
) -> None:
    """SIGTERM is ignored by a tree with a setsid'd loop; SIGKILL ends all of it."""
    loop = "while :; do echo beat >> beat.log; sleep 0.2; done"
    script = f"trap '' TERM; setsid sh -c '{loop}' & sleep 300"
    beat = tmp_path / "beat.log"
    proc = children.start(cg, ["sh", "-c", script], cwd=tmp_path)
    deadline = time.monotonic() + 5
    while not beat.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert cg.signal_all(signal.SIGTERM) >= 3
    assert not await cg.wait_empty(0.5)  # everything ignores SIGTERM
    assert cg.signal_all(signal.SIGKILL) >= 3
    assert await cg.wait_empty(2)

    assert proc.wait(timeout=5) == -signal.SIGKILL
    size = beat.stat().st_size
    time.sleep(0.6)
    assert beat.stat().st_size == size
