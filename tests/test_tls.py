"""TLS on both ports, client certificates (mTLS), and plain clients at a TLS port."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest

from daggyr.config import Config
from daggyr.server import Server, StartupError
from daggyr.v1 import runner_pb2, runner_pb2_grpc

from .certs import Pki, encrypted_key, make_pki
from .conftest import Runner

MakeRunner = Callable[..., Awaitable[Runner]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _tls_settings(pki: Pki, mutual: bool = False) -> dict[str, str]:
    settings = {
        "tls_cert_file": str(pki.server_cert),
        "tls_key_file": str(pki.server_key),
    }
    if mutual:
        settings["tls_client_ca_file"] = str(pki.ca)
    return settings


def _client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


async def _rest(
    runner: Runner, context: ssl.SSLContext | None, scheme: str = "https"
) -> int:
    """The status of GET /api/v1/capacity over its own connection."""
    url = f"{scheme}://127.0.0.1:{runner.server.rest_port}/api/v1/capacity"
    connector = aiohttp.TCPConnector(ssl=context if context else False)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(url) as response,
    ):
        await response.read()
        return response.status


async def _grpc(runner: Runner, credentials: grpc.ChannelCredentials | None) -> object:
    """GetCapacity over a fresh channel; the reply or the AioRpcError."""
    target = f"127.0.0.1:{runner.server.grpc_port}"
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials)
    async with channel:
        stub = runner_pb2_grpc.RunnerStub(channel)
        try:
            return await stub.GetCapacity(runner_pb2.GetCapacityRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc


def _credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _code(outcome: object) -> grpc.StatusCode:
    if isinstance(outcome, grpc.aio.AioRpcError):
        return outcome.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def tls_runner(make_runner: MakeRunner, pki: Pki) -> AsyncIterator[Runner]:
    yield await make_runner(**_tls_settings(pki))


async def test_client_with_the_ca_connects_on_both_ports(
    tls_runner: Runner, pki: Pki
) -> None:
    assert await _rest(tls_runner, _client_context(pki.ca)) == 200
    report = await _grpc(tls_runner, _credentials(pki.ca))
    assert _code(report) == grpc.StatusCode.OK
    assert report.total.cores == 2  # type: ignore[attr-defined]


async def test_client_without_the_ca_is_refused(tls_runner: Runner, pki: Pki) -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _rest(tls_runner, _client_context(None))
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _rest(tls_runner, _client_context(pki.other_ca))
    outcome = await _grpc(tls_runner, _credentials(pki.other_ca))
    assert _code(outcome) == grpc.StatusCode.UNAVAILABLE


async def test_plain_clients_fail_cleanly_and_the_server_carries_on(
    tls_runner: Runner, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        with pytest.raises(aiohttp.ClientError):
            await _rest(tls_runner, None, scheme="http")
        outcome = await _grpc(tls_runner, None)
        assert _code(outcome) == grpc.StatusCode.UNAVAILABLE

    assert await _rest(tls_runner, _client_context(pki.ca)) == 200
    assert _code(await _grpc(tls_runner, _credentials(pki.ca))) == grpc.StatusCode.OK
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_mtls_requires_a_client_certificate_on_both_ports(
    make_runner: MakeRunner, pki: Pki
) -> None:
    runner = await make_runner(**_tls_settings(pki, mutual=True))

    with pytest.raises(aiohttp.ClientError):
        await _rest(runner, _client_context(pki.ca))
    with pytest.raises(aiohttp.ClientError):
        await _rest(
            runner, _client_context(pki.ca, pki.stranger_cert, pki.stranger_key)
        )
    assert _code(await _grpc(runner, _credentials(pki.ca))) == (
        grpc.StatusCode.UNAVAILABLE
    )
    stranger = _credentials(pki.ca, pki.stranger_cert, pki.stranger_key)
    assert _code(await _grpc(runner, stranger)) == grpc.StatusCode.UNAVAILABLE

    context = _client_context(pki.ca, pki.client_cert, pki.client_key)
    assert await _rest(runner, context) == 200
    mine = _credentials(pki.ca, pki.client_cert, pki.client_key)
    assert _code(await _grpc(runner, mine)) == grpc.StatusCode.OK


async def test_tls_and_auth_together(make_runner: MakeRunner, pki: Pki) -> None:
    runner = await make_runner(auth_tokens=["tls-token"], **_tls_settings(pki))
    assert await _rest(runner, _client_context(pki.ca)) == 401

    context = _client_context(pki.ca)
    url = f"https://localhost:{runner.server.rest_port}/api/v1/capacity"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http,
        http.get(url, headers={"Authorization": "Bearer tls-token"}) as response,
    ):
        assert response.status == 200


async def _start_error(settings: dict[str, str]) -> str:
    server = Server(Config.model_validate({**settings, "port": 0, "grpc-port": 0}))
    try:
        with pytest.raises(StartupError) as caught:
            await server.start()
    finally:
        await server.stop()
    return str(caught.value)


async def test_unusable_tls_files_are_startup_errors(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    settings = {**_tls_settings(pki), "tls_cert_file": str(missing)}
    assert f"cannot read tls_cert_file {missing}" in await _start_error(settings)

    settings = {**_tls_settings(pki), "tls_key_file": str(pki.client_key)}
    message = await _start_error(settings)
    assert "not a usable PEM certificate and key" in message

    settings = {**_tls_settings(pki), "tls_client_ca_file": str(pki.server_key)}
    assert "tls_client_ca_file" in await _start_error(settings)


async def test_an_encrypted_key_is_refused_without_a_prompt(
    pki: Pki, tmp_path: Path
) -> None:
    key = encrypted_key(tmp_path, b"pass phrase")
    settings = {**_tls_settings(pki), "tls_key_file": str(key)}
    assert "encrypted" in await _start_error(settings)
