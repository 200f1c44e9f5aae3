"""Bearer tokens on both protocols, token rotation, and the insecure-bind guard."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daggyr.auth import TokenCheck, bearer_middleware, check_bind, is_loopback
from daggyr.config import Config, ConfigError, load_config
from daggyr.rest import build_app
from daggyr.server import Server, StartupError
from daggyr.v1 import runner_pb2, task_pb2

from .conftest import Runner
from .spawn import spawned_runner

TOKEN = "s3cret-token_A.b~c+d/e="
OTHER = "another-token-B"
MakeRunner = Callable[..., Awaitable[Runner]]

# Values of the Authorization header (or metadata) that must be refused.
REFUSED = {
    "wrong token": f"Bearer {OTHER}",
    "Basic": "Basic dXNlcjpwYXNz",
    "scheme only": "Bearer",
    "empty token": "Bearer ",
    "two spaces": f"Bearer  {TOKEN}",
    "token then more": f"Bearer {TOKEN} x",
    "token prefix": f"Bearer {TOKEN[:-1]}",
    "token plus a character": f"Bearer {TOKEN}x",
    "no scheme": TOKEN,
}


def _bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _md(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", value),)


async def _grpc_code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _watch_code(runner: Runner, metadata: object) -> grpc.StatusCode:
    """The status of a server-streaming call."""
    request = runner_pb2.WatchTaskRequest(task_id="nothing-here")
    try:
        async for _ in runner.stub.WatchTask(request, metadata=metadata):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def secured(make_runner: MakeRunner) -> Runner:
    return await make_runner(auth_tokens=[TOKEN])


async def test_rest_refuses_missing_token(secured: Runner) -> None:
    status, body = await secured.rest("GET", "/api/v1/capacity")
    assert status == 401
    assert body["code"] == 16
    assert body["details"] == []
    assert "Bearer <token>" in body["message"]

    async with secured.http.get(secured.base + "/api/v1/task") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="daggyr"'


@pytest.mark.parametrize("value", REFUSED.values(), ids=REFUSED.keys())
async def test_rest_refuses_bad_credentials(secured: Runner, value: str) -> None:
    headers = {"Authorization": value}
    status, body = await secured.rest("GET", "/api/v1/capacity", headers=headers)
    assert status == 401, body
    assert body["code"] == 16
    assert TOKEN not in body["message"] and OTHER not in body["message"]
    async with secured.http.get(
        secured.base + "/api/v1/task", headers=headers
    ) as response:
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="daggyr"')


async def test_rest_refuses_before_reading_the_body(secured: Runner) -> None:
    """A refused submission runs nothing and says nothing about the task."""
    status, body = await secured.rest(
        "POST", "/api/v1/task/no-auth", {"command": ["true"]}
    )
    assert status == 401
    status, body = await secured.rest("GET", "/api/v1/task/no-auth", headers=_bearer())
    assert status == 404, body


async def test_rest_refuses_two_authorization_headers(secured: Runner) -> None:
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer x")]
    async with secured.http.get(
        secured.base + "/api/v1/capacity", headers=headers
    ) as response:
        assert response.status == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_rest_accepts_the_token_with_any_case_of_scheme(
    secured: Runner, scheme: str
) -> None:
    headers = {"Authorization": f"{scheme} {TOKEN}"}
    status, body = await secured.rest("GET", "/api/v1/capacity", headers=headers)
    assert status == 200, body
    assert "total" in body


async def test_rest_trailing_space_is_not_part_of_the_header(secured: Runner) -> None:
    """HTTP/1.1 strips a header value's trailing whitespace (RFC 9110 5.5).

    So on REST ``Bearer <token> `` arrives as ``Bearer <token>``: the server
    never sees the space. On gRPC metadata keeps it and the token is refused
    (test_grpc_refuses_bad_credentials).
    """
    for value, expected in ((f"Bearer {TOKEN} ", 200), (f"Bearer {OTHER} ", 401)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", secured.server.rest_port
        )
        writer.write(
            f"GET /api/v1/capacity HTTP/1.1\r\nHost: x\r\nAuthorization: {value}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert int(reply.split(b" ", 2)[1]) == expected, reply[:200]


async def test_rest_ready_stays_open(secured: Runner) -> None:
    status, body = await secured.rest("GET", "/ready")
    assert status == 200
    assert body == {"status": "SERVING"}
    # The route that answers decides: no spelling of a path reaches the API
    # through the open /ready route.
    for path in ("/%72eady", "/ready/../api/v1/capacity", "/ready/%2e%2e/api/v1/task"):
        status, body = await secured.rest("GET", path)
        assert status in (200, 401, 404), (path, status)
        assert "total" not in body and "tasks" not in body, (path, body)


async def test_rest_unknown_path_needs_a_token_too(secured: Runner) -> None:
    status, _ = await secured.rest("GET", "/api/v1/nothing")
    assert status == 401
    status, _ = await secured.rest("GET", "/api/v1/nothing", headers=_bearer())
    assert status == 404


async def _serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]


@pytest.mark.parametrize("require", [False, True])
async def test_metrics_open_unless_configured(require: bool) -> None:
    """/metrics is open by default; metrics_require_auth closes it."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="daggyr_up 1\n")

    check = TokenCheck([TOKEN], None)
    app = build_app(
        object(),
        max_request_bytes=1 << 20,
        ready=lambda: True,
        middlewares=[bearer_middleware(check, metrics_require_auth=require)],
        extra_routes=[web.get("/metrics", metrics)],
    )
    runner, port = await _serve_app(app)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/metrics"
            async with http.get(url) as response:
                assert response.status == (401 if require else 200)
            async with http.get(url, headers=_bearer()) as response:
                assert response.status == 200
                assert await response.text() == "daggyr_up 1\n"
    finally:
        await runner.cleanup()


async def test_grpc_refuses_missing_token(secured: Runner) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured.stub.GetCapacity(runner_pb2.GetCapacityRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer <token>" in (caught.value.details() or "")
    assert await _watch_code(secured, None) == grpc.StatusCode.UNAUTHENTICATED


GRPC_REFUSED = {**REFUSED, "trailing space": f"Bearer {TOKEN} "}


@pytest.mark.parametrize("value", GRPC_REFUSED.values(), ids=GRPC_REFUSED.keys())
async def test_grpc_refuses_bad_credentials(secured: Runner, value: str) -> None:
    call = secured.stub.GetCapacity(
        runner_pb2.GetCapacityRequest(), metadata=_md(value)
    )
    assert await _grpc_code(call) == grpc.StatusCode.UNAUTHENTICATED
    code = await _watch_code(secured, _md(value))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert TOKEN not in (exc.details() or "")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_grpc_accepts_the_token(secured: Runner, scheme: str) -> None:
    md = _md(f"{scheme} {TOKEN}")
    report = await secured.stub.GetCapacity(
        runner_pb2.GetCapacityRequest(), metadata=md
    )
    assert report.total.cores == 2
    # The token gets through to the service: this NOT_FOUND comes from it.
    assert await _watch_code(secured, md) == grpc.StatusCode.NOT_FOUND


async def test_grpc_unknown_method_is_refused_without_token(secured: Runner) -> None:
    call = secured.channel.unary_unary("/daggyr.v1.Runner/NoSuchMethod")
    assert await _grpc_code(call(b"")) == grpc.StatusCode.UNAUTHENTICATED
    with_token = call(b"", metadata=_md(f"Bearer {TOKEN}"))
    assert await _grpc_code(with_token) == grpc.StatusCode.UNIMPLEMENTED


async def test_grpc_health_open_reflection_closed(secured: Runner) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(secured.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    async def services(metadata: object) -> list[str]:
        async for answer in reflect.ServerReflectionInfo(
            iter([request]), metadata=metadata
        ):
            return [s.name for s in answer.list_services_response.service]
        return []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await services(None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "daggyr.v1.Runner" in await services(_md(f"Bearer {TOKEN}"))


async def _both_accept(runner: Runner, token: str) -> tuple[int, grpc.StatusCode]:
    status, _ = await runner.rest("GET", "/api/v1/capacity", headers=_bearer(token))
    call = runner.stub.GetCapacity(
        runner_pb2.GetCapacityRequest(), metadata=_md(f"Bearer {token}")
    )
    return status, await _grpc_code(call)


OK = (200, grpc.StatusCode.OK)
REFUSED_BOTH = (401, grpc.StatusCode.UNAUTHENTICATED)


async def test_tokens_from_config_and_file(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# daggyd\n\n  {OTHER}  \n#{TOKEN}-commented\n")
    token_file.chmod(0o600)
    runner = await make_runner(auth_tokens=[TOKEN], auth_token_file=str(token_file))
    assert await _both_accept(runner, TOKEN) == OK
    assert await _both_accept(runner, OTHER) == OK
    assert await _both_accept(runner, f"{TOKEN}-commented") == REFUSED_BOTH
    assert await _both_accept(runner, "# daggyd") == REFUSED_BOTH


async def test_rotation_through_the_token_file(
    make_runner: MakeRunner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    runner = await make_runner(auth_token_file=str(token_file))
    assert await _both_accept(runner, TOKEN) == OK
    assert await _both_accept(runner, OTHER) == REFUSED_BOTH

    token_file.write_text(OTHER + "\n")
    with caplog.at_level(logging.INFO, logger="daggyr"):
        runner.server.reload_tokens()
    assert "1 bearer token(s) loaded" in caplog.text
    assert await _both_accept(runner, OTHER) == OK
    assert await _both_accept(runner, TOKEN) == REFUSED_BOTH


async def test_unreadable_token_file_on_reload_keeps_the_tokens(
    make_runner: MakeRunner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    runner = await make_runner(auth_token_file=str(token_file))

    token_file.unlink()
    with caplog.at_level(logging.INFO, logger="daggyr"):
        runner.server.reload_tokens()
    assert f"cannot read auth_token_file {token_file}" in caplog.text
    assert "keeping the 1 token(s) held" in caplog.text
    assert await _both_accept(runner, TOKEN) == OK

    token_file.write_text(f"{OTHER}\nnot a token\n")
    runner.server.reload_tokens()
    assert f"{token_file} line 2" in caplog.text
    assert "not a token" not in caplog.text
    assert await _both_accept(runner, TOKEN) == OK
    assert await _both_accept(runner, OTHER) == REFUSED_BOTH


async def test_an_emptied_token_file_refuses_everyone(
    make_runner: MakeRunner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    runner = await make_runner(auth_token_file=str(token_file))
    token_file.write_text("# every token revoked\n")
    with caplog.at_level(logging.INFO, logger="daggyr"):
        runner.server.reload_tokens()
    assert "every request will be refused" in caplog.text
    assert await _both_accept(runner, TOKEN) == REFUSED_BOTH


async def test_sighup_reloads_the_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    settings = {"auth_token_file": str(token_file)}
    async with (
        spawned_runner(tmp_path, settings) as spawned,
        aiohttp.ClientSession() as http,
    ):
        url = f"http://127.0.0.1:{spawned.rest_port}/api/v1/capacity"

        async def status(token: str) -> int:
            async with http.get(url, headers=_bearer(token)) as response:
                return response.status

        assert (await status(TOKEN), await status(OTHER)) == (200, 401)
        token_file.write_text(f"{OTHER}\n")
        os.kill(spawned.proc.pid, signal.SIGHUP)
        await spawned.wait_for("bearer token\\(s\\) loaded", count=2)
        assert (await status(TOKEN), await status(OTHER)) == (401, 200)
        spawned.stop()
        assert await spawned.wait_exit() == 0
        assert TOKEN not in spawned.text() and OTHER not in spawned.text()


async def test_sighup_without_auth_does_not_stop_the_runner(tmp_path: Path) -> None:
    async with spawned_runner(tmp_path) as spawned:
        os.kill(spawned.proc.pid, signal.SIGHUP)
        await spawned.wait_for("no auth_token_file to reload")
        assert spawned.proc.poll() is None


async def test_bad_token_settings_are_startup_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    cases = [
        ({"auth_token_file": str(missing)}, f"cannot read auth_token_file {missing}"),
        ({"auth_tokens": ["fine", "has space"]}, "auth_tokens[1]"),
        ({"auth_tokens": [""]}, "auth_tokens[0]"),
    ]
    for settings, expected in cases:
        server = Server(Config.model_validate({**settings, "port": 0, "grpc-port": 0}))
        with pytest.raises(StartupError) as caught:
            await server.start()
        assert expected in str(caught.value)
        assert "has space" not in str(caught.value)
        await server.stop()


def test_config_errors_do_not_echo_tokens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"auth_tokens": TOKEN})
    assert "auth_tokens" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(load_config(None, {"auth_tokens": [TOKEN]}))


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "LocalHost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "example.com", ""):
        assert not is_loopback(host), host


def test_check_bind(caplog: pytest.LogCaptureFixture) -> None:
    from daggyr.auth import SecuritySetupError

    public = Config(ip="0.0.0.0")
    with pytest.raises(SecuritySetupError) as caught:
        check_bind(public, None)
    assert "--allow-insecure-bind" in str(caught.value)
    check_bind(public, TokenCheck([TOKEN], None))  # auth on: allowed
    mutual = Config(
        ip="0.0.0.0",
        tls_cert_file="c.pem",
        tls_key_file="k.pem",
        tls_client_ca_file="ca.pem",
    )
    check_bind(mutual, None)  # client certificates are auth too
    check_bind(Config(ip="::1"), None)
    with caplog.at_level(logging.WARNING, logger="daggyr"):
        check_bind(Config(ip="0.0.0.0", allow_insecure_bind=True), None)
    assert "without authentication" in caplog.text


async def test_public_bind_without_auth_is_refused_before_binding() -> None:
    server = Server(Config(ip="0.0.0.0", port=0, grpc_port=0))
    with pytest.raises(StartupError) as caught:
        await server.start()
    assert "--allow-insecure-bind" in str(caught.value)
    assert server.rest_port == 0 and server.grpc_port == 0
    await server.stop()


def _netns() -> list[str]:
    """Run in a fresh network namespace: 0.0.0.0 there reaches nothing outside."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare for a private network namespace")
    return [unshare, "--net", "--"]


async def test_cli_public_bind_needs_the_flag(tmp_path: Path) -> None:
    wrapper = _netns()
    async with spawned_runner(
        tmp_path, args=["--ip", "0.0.0.0"], wrapper=wrapper, wait=False
    ) as spawned:
        assert await spawned.wait_exit() != 0
        text = spawned.text()
        assert "refusing to listen on 0.0.0.0 without authentication" in text
        assert "--allow-insecure-bind" in text
        assert "listening on" not in text.replace("refusing to listen on", "")

    async with spawned_runner(
        tmp_path, args=["--ip", "0.0.0.0", "--allow-insecure-bind"], wrapper=wrapper
    ) as spawned:
        text = spawned.text()
        assert "WARNING" in text and "without authentication" in text
        assert spawned.rest_port > 0 and spawned.grpc_port > 0
        spawned.stop()
        assert await spawned.wait_exit() == 0


async def test_tokens_never_leak(
    make_runner: MakeRunner,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not in logs at DEBUG, attempts, error messages or a task's environment."""
    wrong = "wrong-token-that-must-not-show"
    token_file = tmp_path / "tokens"
    token_file.write_text(OTHER + "\n")
    monkeypatch.setenv("DAGGYR_TOKEN", TOKEN)  # the runner's own environment
    caplog.set_level(logging.DEBUG)
    runner = await make_runner(auth_tokens=[TOKEN], auth_token_file=str(token_file))
    md = _md(f"Bearer {TOKEN}")

    texts: list[str] = []
    commands = {
        "env": ["env"],
        "fails": ["sh", "-c", "echo $DAGGYR_TOKEN; exit 3"],
        "missing": ["no-such-command-here"],
        "proc-env": ["sh", "-c", "tr '\\0' '\\n' < /proc/$$/environ"],
    }
    for task_id, command in commands.items():
        status, body = await runner.rest(
            "POST", f"/api/v1/task/{task_id}", {"command": command}, headers=_bearer()
        )
        assert status == 200, body
        final = await runner.stub.GetTask(
            runner_pb2.GetTaskRequest(task_id=task_id, wait_seconds=30), metadata=md
        )
        assert final.state != task_pb2.RUNNING
        texts += [final.output_log, final.error_log, "\n".join(final.executor_log)]
    env_output = texts[0]
    assert "PATH=" in env_output and "DAGGYR_TOKEN" not in env_output

    for value in (f"Bearer {wrong}", f"Basic {wrong}", wrong):
        status, body = await runner.rest(
            "GET", "/api/v1/capacity", headers={"Authorization": value}
        )
        assert status == 401
        texts.append(str(body))
        try:
            await runner.stub.GetCapacity(
                runner_pb2.GetCapacityRequest(), metadata=_md(value)
            )
        except grpc.aio.AioRpcError as exc:
            texts.append(str(exc.details()))
    runner.server.reload_tokens()
    await runner.server.stop()

    texts.append(caplog.text)
    texts += [str(record.args) for record in caplog.records]
    for secret in (TOKEN, OTHER, wrong):
        for text in texts:
            assert secret not in text
    assert "bearer token(s) loaded" in caplog.text  # the log was captured
