"""daggyr.client against a runner with TLS and tokens, over both protocols."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from daggyr.client import Client
from daggyr.errors import Unauthenticated, Unavailable
from daggyr.v1 import task_pb2

from .certs import make_pki
from .conftest import Runner

MakeRunner = Callable[..., Awaitable[Runner]]
TOKEN = "client-tls-token"


@pytest.mark.parametrize("scheme", ["https", "grpcs"])
async def test_client_over_tls_with_a_token(
    make_runner: MakeRunner, tmp_path: Path, scheme: str
) -> None:
    pki = make_pki(tmp_path / "pki")
    runner = await make_runner(
        auth_tokens=[TOKEN],
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
    )
    port = runner.server.rest_port if scheme == "https" else runner.server.grpc_port
    url = f"{scheme}://localhost:{port}"
    token_file = tmp_path / "token"
    token_file.write_text(f"# for the test\n{TOKEN}\n")

    async with Client(url, token_file=str(token_file), ca_file=str(pki.ca)) as client:
        report = await client.capacity()
        assert report.total.cores == 2
        await client.submit("tls-task", task_pb2.Task(command=["echo", "over tls"]))
        final = await client.get("tls-task", wait_seconds=30)
        assert final.state == task_pb2.SUCCEEDED
        assert final.output_log == "over tls\n"

    async with Client(url, token="wrong", ca_file=str(pki.ca)) as client:
        with pytest.raises(Unauthenticated):
            await client.capacity()

    async with Client(url, token=TOKEN, ca_file=str(pki.other_ca)) as client:
        with pytest.raises(Unavailable):
            await client.capacity()


@pytest.mark.parametrize("scheme", ["https", "grpcs"])
async def test_submit_command_over_tls_with_a_token_file(
    make_runner: MakeRunner, tmp_path: Path, scheme: str
) -> None:
    pki = make_pki(tmp_path / "pki")
    runner = await make_runner(
        auth_tokens=[TOKEN],
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
    )
    port = runner.server.rest_port if scheme == "https" else runner.server.grpc_port
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    base = [sys.executable, "-m", "daggyr.cli", "submit"]
    base += ["--runner", f"{scheme}://127.0.0.1:{port}", "--ca", str(pki.ca)]

    async def submit(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *base,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await submit("--token-file", str(token_file), "--", "echo", "hi")
    assert (code, out) == (0, "hi\n"), err
    code, out, err = await submit("--token", "wrong", "--", "echo", "hi")
    assert code != 0 and out == ""
    assert "bearer token" in err and "wrong" not in err
