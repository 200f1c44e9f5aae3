"""daggyr.client against real runners: both protocols give the same answers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from daggyr.client import Client, parse_url
from daggyr.errors import (
    AlreadyExists,
    DaggyrError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from daggyr.grpc_server import add_services
from daggyr.rest import build_app
from daggyr.servicer import RunnerServicer
from daggyr.v1 import task_pb2

from .conftest import Runner

State = task_pb2.State
PROTOCOLS = ("rest", "grpc")


def url_of(runner: Runner, protocol: str) -> str:
    if protocol == "grpc":
        return f"grpc://127.0.0.1:{runner.server.grpc_port}"
    return f"http://127.0.0.1:{runner.server.rest_port}"


@pytest.fixture
async def clients(runner: Runner) -> AsyncIterator[dict[str, Client]]:
    made = {p: Client(url_of(runner, p)) for p in PROTOCOLS}
    yield made
    for client in made.values():
        await client.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def comparable(attempt: task_pb2.TaskAttempt) -> dict[str, Any]:
    """What must agree between protocols: everything but ids, times and usage."""
    return {
        "state": State.Name(attempt.state),
        "exit_code": attempt.exit_code if attempt.HasField("exit_code") else None,
        "signal": attempt.signal,
        "output_log": attempt.output_log,
        "error_log": attempt.error_log,
        "task": attempt.task.SerializeToString(deterministic=True),
    }


async def test_same_calls_same_results(clients: dict[str, Client]) -> None:
    task = task_pb2.Task(
        command=["sh", "-c", 'echo "out $GREETING"; echo err >&2; exit 3'],
        environment={"GREETING": "hello"},
        memory_mb=64,
    )
    finals = {}
    for protocol, client in clients.items():
        task_id = f"same/{protocol}:1"  # '/' and ':' survive both protocols
        first = await client.submit(task_id, task)
        assert first.task_id == task_id
        assert first.state in (State.QUEUED, State.RUNNING)
        assert (await client.submit(task_id, task)).task_id == task_id  # idempotent
        finals[protocol] = await client.wait(task_id, timeout=30)
        assert finals[protocol].task_id == task_id
        polled = await client.get(task_id)
        assert polled == finals[protocol]

    rest, grpc_ = (comparable(finals[p]) for p in PROTOCOLS)
    assert rest == grpc_
    assert rest["state"] == "FAILED" and rest["exit_code"] == 3
    assert rest["output_log"] == "out hello\n" and rest["error_log"] == "err\n"

    listings = {}
    for protocol, client in clients.items():
        tasks, token = await client.list()
        assert token == ""
        listings[protocol] = [(a.task_id, a.state, a.output_log) for a in tasks]
        report = await client.capacity()
        assert (report.total.cores, report.total.memory_mb) == (2, 4096)
    assert listings["rest"] == listings["grpc"]
    assert listings["rest"] == [
        ("same/rest:1", State.FAILED, ""),  # listed without logs
        ("same/grpc:1", State.FAILED, ""),
    ]


async def test_list_pages_and_filter(clients: dict[str, Client]) -> None:
    client = clients["rest"]
    for number in range(5):
        await client.submit(f"page-{number}", task_pb2.Task(command=["true"]))
    for number in range(5):
        await client.wait(f"page-{number}", timeout=30)
    for protocol, c in clients.items():
        first, token = await c.list(page_size=2)
        assert [a.task_id for a in first] == ["page-0", "page-1"], protocol
        assert token
        every = [a.task_id async for a in c.iter_tasks(page_size=2)]
        assert every == [f"page-{n}" for n in range(5)], protocol
        assert [a async for a in c.iter_tasks([State.RUNNING])] == []
        succeeded = [a async for a in c.iter_tasks([State.SUCCEEDED, State.FAILED])]
        assert len(succeeded) == 5


async def test_watch_cancel_and_delete(clients: dict[str, Client]) -> None:
    for protocol, client in clients.items():
        task_id = f"sleeper-{protocol}"
        await client.submit(task_id, task_pb2.Task(command=["sleep", "60"]))
        seen: list[task_pb2.TaskAttempt] = []
        follower = asyncio.ensure_future(
            client.wait(task_id, timeout=30, on_change=seen.append)
        )
        await asyncio.sleep(0.3)
        cancelled = await client.cancel(task_id)
        assert cancelled.state == State.CANCELLED
        final = await follower
        assert final.state == State.CANCELLED
        assert [a.state for a in seen][-2:] == [State.RUNNING, State.CANCELLED]

        states = [a.state async for a in client.watch(task_id)]
        assert states == [State.CANCELLED]
        deleted = await client.delete(task_id)
        assert deleted.state == State.CANCELLED
        with pytest.raises(NotFound):
            await client.get(task_id)


async def test_wait_timeout_leaves_the_task_running(
    clients: dict[str, Client],
) -> None:
    for protocol, client in clients.items():
        task_id = f"slow-{protocol}"
        await client.submit(task_id, task_pb2.Task(command=["sleep", "60"]))
        with pytest.raises(DeadlineExceeded, match=f"task '{task_id}'.*0.5 s"):
            await client.wait(task_id, timeout=0.5)
        assert (await client.get(task_id)).state == State.RUNNING
        await client.cancel(task_id)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_errors_map_to_classes(clients: dict[str, Client], protocol: str) -> None:
    client = clients[protocol]
    with pytest.raises(NotFound, match="'missing'") as caught:
        await client.get("missing")
    original = grpc.aio.AioRpcError if protocol == "grpc" else Exception
    assert isinstance(caught.value.__cause__, original)

    await client.submit("held", task_pb2.Task(command=["true"]))
    with pytest.raises(AlreadyExists, match="'held'"):
        await client.submit("held", task_pb2.Task(command=["false"]))
    with pytest.raises(InvalidArgument, match="task_id 'bad id' contains ' '"):
        await client.submit("bad id", task_pb2.Task(command=["true"]))
    with pytest.raises(InvalidArgument, match="command is required"):
        await client.submit("empty", task_pb2.Task())
    with pytest.raises(InvalidArgument, match="task_id is required"):
        await client.get("")
    with pytest.raises(FailedPrecondition, match="needs 64 cores"):
        await client.submit("huge", task_pb2.Task(command=["true"], cores=64))
    with pytest.raises(OutOfRange, match="wait_seconds"):
        await client.get("held", wait_seconds=61)
    with pytest.raises(InvalidArgument, match="page_token"):
        await client.list(page_token="garbage")


@pytest.mark.parametrize("scheme", ["http", "grpc"])
async def test_unreachable_runner_is_unavailable(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{closed_port()}"
    async with Client(url) as client:
        with pytest.raises(Unavailable, match=url):
            await client.capacity()
        with pytest.raises(ConnectionError):  # Unavailable is one, too
            await client.get("x")


async def test_http_errors_without_a_json_body() -> None:
    """A proxy's page in front of a runner still maps by its HTTP status."""

    async def reply(request: web.Request) -> web.Response:
        status = {"busy": 503, "broken": 502}[request.path.rsplit("/", 1)[-1]]
        return web.Response(status=status, text="<h1>bad</h1>")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reply)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        async with Client(f"http://127.0.0.1:{sock.getsockname()[1]}") as client:
            with pytest.raises(Unavailable, match="HTTP 503: <h1>bad</h1>"):
                await client.get("busy")
            with pytest.raises(DaggyrError, match="HTTP 502") as caught:
                await client.get("broken")
            assert caught.value.code == 2  # UNKNOWN, as grpc-gateway reads a 502
    finally:
        await runner.cleanup()


def test_urls(tmp_path: Path) -> None:
    assert parse_url("http://127.0.0.1:2504").protocol == "rest"
    assert parse_url("grpcs://localhost:2505").tls
    assert parse_url("127.0.0.1:2505", "grpc").url == "grpc://127.0.0.1:2505"
    assert parse_url("[::1]:2504").url == "http://[::1]:2504"
    with pytest.raises(InvalidArgument, match="scheme 'ftp'"):
        parse_url("ftp://h:1")
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        parse_url("http://h")
    with pytest.raises(InvalidArgument, match="not a grpc URL"):
        parse_url("http://h:1", "grpc")
    with pytest.raises(InvalidArgument, match="ca_file is for TLS"):
        Client("http://127.0.0.1:1", ca_file="/x")
    empty = tmp_path / "token"
    empty.write_text("# no token yet\n\n")
    with pytest.raises(InvalidArgument, match="holds no token"):
        Client("http://127.0.0.1:1", token_file=str(empty))


# -- bearer tokens and TLS, against the same core served over TLS ----------------


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class _SeenMetadata(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        self.seen.append(dict(details.invocation_metadata).get("authorization", ""))
        return await continuation(details)


async def test_token_and_tls_on_both_protocols(
    runner: Runner, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    servicer = RunnerServicer(runner.server.runner)  # type: ignore[arg-type]
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> Any:
        seen.append(request.headers.get("Authorization", ""))
        return await handler(request)

    app = build_app(
        servicer, max_request_bytes=1 << 20, ready=lambda: True, middlewares=[record]
    )
    web_runner = web.AppRunner(app)
    await web_runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(web_runner, sock, ssl_context=context).start()
    server = grpc.aio.server(interceptors=[_SeenMetadata(seen)])
    add_services(server, servicer)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    grpc_port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    token_file = tmp_path / "token"
    token_file.write_text("# the runner's format\n\ns3cret-from-file\n")
    try:
        urls = [
            f"https://127.0.0.1:{sock.getsockname()[1]}",
            f"grpcs://127.0.0.1:{grpc_port}",
        ]
        for url in urls:
            async with Client(url, ca_file=str(cert), token="s3cret") as client:
                assert (await client.capacity()).total.cores == 2
                task = task_pb2.Task(command=["echo", "over tls"])
                await client.submit(f"tls-{url[:5]}", task)
                final = await client.wait(f"tls-{url[:5]}", timeout=30)
                assert final.output_log == "over tls\n"
            async with Client(url, ca_file=str(cert), token_file=str(token_file)) as c:
                await c.capacity()
            async with Client(url) as untrusting:  # system roots: not ours
                with pytest.raises(Unavailable):
                    await untrusting.capacity()
        assert set(seen) == {"Bearer s3cret", "Bearer s3cret-from-file"}
        assert len(seen) >= 8
    finally:
        await server.stop(None)
        await web_runner.cleanup()
