from collections.abc import Sequence

__all__ = ["spawn"]

def spawn(
    path: bytes,
    argv: Sequence[bytes],
    envp: Sequence[bytes],
    cwd: bytes | None,
    procs: Sequence[bytes],
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    uid: int,
    gid: int,
    /,
) -> int | tuple[str, int, int]: ...
