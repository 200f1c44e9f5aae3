"""Sampling the runner with py-spy while a figure runs, when py-spy is installed."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

__all__ = ["py_spy"]

logger = logging.getLogger(__name__)


@asynccontextmanager
async def py_spy(pid: int, output: Path | None) -> AsyncIterator[None]:
    """Record ``pid`` into ``output`` (collapsed stacks) for the block's duration.

    Does nothing without ``output``. Sampling is non-blocking, so the runner is
    never paused, but py-spy takes CPU of its own on a small machine: figures
    measured under it read lower than without.
    """
    if output is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await proc.communicate()
        logger.info("py-spy: %s", err.decode(errors="replace").strip()[-200:])
