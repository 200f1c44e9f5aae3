"""The runner's side of the cgroup layer: its root, and one cgroup per task."""

from __future__ import annotations

import abc
import logging
import signal

from daggyr.cgroups.base import CgroupError
from daggyr.cgroups.fs import CgroupFs
from daggyr.cgroups.task import TaskCgroup

__all__ = ["CgroupManager", "make_dir", "remove_roots", "undo_mkdirs"]

logger = logging.getLogger(__name__)

# How long a leftover cgroup's processes get to die after SIGKILL.
_LEFTOVER_KILL_SECONDS = 5.0


class CgroupManager(abc.ABC):
    """Creates the runner's root cgroup(s) and a cgroup per task under them."""

    mode: str
    reason: str = ""
    root_paths: tuple[str, ...] = ()

    @abc.abstractmethod
    def setup(self) -> list[str]:
        """Create the root(s) and clean what a killed runner left there.

        Every leftover task cgroup under the root has its processes killed
        (SIGKILL) and is removed. Returns one line per cgroup cleaned.
        Idempotent.
        """

    @abc.abstractmethod
    def create(
        self, name: str, cores: float, memory_mb: int, pids_max: int
    ) -> TaskCgroup | None:
        """A new task cgroup with its limits written, or None without cgroups.

        ``name`` must be a single path component not already in use. On any
        failure, what was created is removed again and CgroupError is raised.
        """

    @abc.abstractmethod
    def own_limits(self) -> tuple[float | None, int | None]:
        """The (cores, memory_mb) limits daggyr itself runs under; None if none."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Remove the root(s) if no task cgroup is left in them; never raises."""

    def _clean_leftovers(self, leftovers: list[TaskCgroup]) -> list[str]:
        lines = []
        for cgroup in leftovers:
            killed = cgroup.signal_all(signal.SIGKILL)
            if not cgroup.wait_empty_now(_LEFTOVER_KILL_SECONDS):
                raise CgroupError(
                    f"leftover cgroup {cgroup.path} still holds processes "
                    f"{cgroup.pids()} after SIGKILL"
                )
            cgroup.remove_now()
            line = f"cleaned leftover cgroup {cgroup.path} (killed {killed} processes)"
            logger.info(
                "cleaned leftover cgroup %s (killed %s processes)",
                cgroup.path,
                killed,
                extra={"cgroup": cgroup.path, "killed": killed},
            )
            lines.append(line)
        return lines


def make_dir(fs: CgroupFs, path: str, *, exist_ok: bool = False) -> None:
    """mkdir one cgroup; CgroupError naming it (also if it exists, unless allowed)."""
    try:
        fs.mkdir(path)
    except FileExistsError as exc:
        if not exist_ok:
            raise CgroupError(f"cgroup {path} already exists") from exc
    except OSError as exc:
        raise CgroupError(f"mkdir {path}: {exc.strerror}") from exc


def remove_roots(fs: CgroupFs, roots: tuple[str, ...]) -> None:
    """rmdir each root; one still holding task cgroups is left alone."""
    for root in roots:
        try:
            fs.rmdir(root)
            logger.debug("removed cgroup root %s", root)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cgroup root %s left in place: %s", root, exc.strerror)


def undo_mkdirs(fs: CgroupFs, created: list[str]) -> str:
    """rmdir what a failed create() made, newest first; what could not be, if any."""
    left = []
    for directory in reversed(created):
        try:
            fs.rmdir(directory)
        except FileNotFoundError:
            continue
        except OSError as exc:
            left.append(f"{directory} ({exc.strerror})")
    return ", ".join(left)
