"""Interop: a Node.js client built from proto/ with @grpc/grpc-js drives a runner."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import IS_ROOT, Runner

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "node" / "client.mjs"


def require_node() -> str:
    """The node binary; missing tools fail as root or in CI, else skip."""
    node = shutil.which("node")
    if node is None:
        why = "node is not installed"
    elif (
        not (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir()
        or not (ROOT / "node_modules" / "@grpc" / "proto-loader").is_dir()
    ):
        why = (
            "node_modules is missing @grpc/grpc-js or @grpc/proto-loader: run `npm ci`"
        )
    else:
        return node
    if IS_ROOT or os.environ.get("CI"):
        pytest.fail(f"{why} (make test installs it)")
    pytest.skip(why)


async def node_client(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        require_node(),
        str(CLIENT),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_node_client_submits_watches_and_reads(runner: Runner) -> None:
    script = 'sleep 0.5; echo "hello from $FROM"; echo warn >&2'
    code, stdout, stderr = await node_client(
        f"127.0.0.1:{runner.server.grpc_port}", "node/interop-1", "sh", "-c", script
    )
    assert code == 0, stderr
    report = json.loads(stdout)

    assert report["submitted"]["task_id"] == "node/interop-1"
    assert report["submitted"]["state"] in ("QUEUED", "RUNNING")
    assert report["states"][0] in ("QUEUED", "RUNNING")
    assert report["states"][-1] == "SUCCEEDED"
    final = report["final"]
    assert final["state"] == "SUCCEEDED"
    assert final["exit_code"] == 0
    assert final["output_log"] == "hello from node\n"
    assert final["error_log"] == "warn\n"
    assert final["task"]["memory_mb"] == 64
    assert final["task"]["command"] == ["sh", "-c", script]

    # The same task, read back by this side, agrees with what node printed.
    status, body = await runner.rest("GET", "/api/v1/task/node/interop-1")
    assert status == 200
    assert body["output_log"] == final["output_log"]
    assert body["state"] == final["state"]


async def test_node_client_sees_errors(runner: Runner) -> None:
    code, stdout, stderr = await node_client(
        f"127.0.0.1:{runner.server.grpc_port}", "bad id", "true"
    )
    assert code == 1 and stdout == ""
    assert "3 INVALID_ARGUMENT: task_id 'bad id' contains ' '" in stderr
