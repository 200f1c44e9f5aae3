"""Every read, write, mkdir and rmdir the cgroup layer makes, in one place.

The back-ends never touch the filesystem directly, so tests can hand them a
``CgroupFs`` that lays controller files into a plain directory tree where the
kernel would have.
"""

from __future__ import annotations

import logging
import os

from daggyr.cgroups.base import CgroupError

__all__ = ["CgroupFs", "ancestors", "inside", "optional_words", "parse_keyed"]

logger = logging.getLogger(__name__)


class CgroupFs:
    """The cgroup filesystem as the kernel presents it."""

    def read(self, path: str) -> str:
        """The file's whole text; CgroupError naming the file if it can't be read."""
        try:
            # Paths in mountinfo and /proc/self/cgroup may be any bytes.
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except OSError as exc:
            raise CgroupError(f"read {path}: {_why(exc)}") from exc

    def read_int(self, path: str) -> int:
        """The file's single integer; CgroupError naming the file otherwise."""
        text = self.read(path)
        try:
            return int(text)
        except ValueError:
            raise CgroupError(f"{path}: expected an integer, got {text!r}") from None

    def write(self, path: str, value: str) -> None:
        """Write ``value`` in one write(2); CgroupError naming file and errno text.

        The file is never created: a missing controller file is an error, not
        a new plain file that would silently enforce nothing.
        """
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"open {path} for writing: {_why(exc)}") from exc
        try:
            # cgroup files take one value per write(2); a short write is an error.
            data = value.encode("ascii")
            if os.write(fd, data) != len(data):
                raise CgroupError(f"write {value!r} to {path}: short write")
        except OSError as exc:
            raise CgroupError(f"write {value!r} to {path}: {_why(exc)}") from exc
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        """Whether the file or directory exists."""
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory and not a symlink to one."""
        return os.path.isdir(path) and not os.path.islink(path)

    def mkdir(self, path: str) -> None:
        """Create one cgroup directory; raises OSError (EEXIST, EACCES...)."""
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        """Remove one cgroup directory; raises OSError (EBUSY, ENOENT...)."""
        os.rmdir(path)

    def subdirs(self, path: str) -> list[str]:
        """The names of the child cgroups of ``path`` (never symlinks), sorted."""
        try:
            with os.scandir(path) as entries:
                return sorted(
                    e.name for e in entries if e.is_dir(follow_symlinks=False)
                )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CgroupError(f"list {path}: {_why(exc)}") from exc

    def writable(self, path: str) -> bool:
        """Whether this process may create cgroups in the directory ``path``."""
        mode = os.W_OK | os.X_OK
        if os.access in os.supports_effective_ids:
            return os.access(path, mode, effective_ids=True)
        return os.access(path, mode)


def parse_keyed(text: str) -> dict[str, int]:
    """Parse a flat keyed file (``cpu.stat``, ``memory.events``...): key value."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def optional_words(fs: CgroupFs, path: str) -> list[str]:
    """The words of a limit file of ``max`` or numbers; none if absent or odd."""
    if not fs.exists(path):
        return []
    try:
        words = fs.read(path).split()
    except CgroupError as exc:
        logger.debug("ignoring %s", exc)
        return []
    if all(w == "max" or w.lstrip("-").isdigit() for w in words):
        return words
    logger.debug("ignoring %s: unexpected content %r", path, " ".join(words))
    return []


def inside(path: str, root: str) -> bool:
    """Whether ``path`` lies strictly below ``root`` (lexically, after normpath)."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path.startswith(root.rstrip(os.sep) + os.sep)


def ancestors(mount: str, relative: str) -> list[str]:
    """``mount/relative`` and each of its parents up to ``mount``, deepest first."""
    parts = [p for p in relative.split("/") if p and p not in (".", "..")]
    dirs = [os.path.join(mount, *parts[:n]) for n in range(len(parts), -1, -1)]
    return [os.path.normpath(d) for d in dirs]


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
