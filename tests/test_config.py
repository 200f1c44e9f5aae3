"""The config file and the flags over it: what starts, and what is refused."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daggyr.config import CapacityOverrides, Config, ConfigError, load_config

from .conftest import Runner
from .process_helpers import DAGGYR, cgroup_dirs, free_port, port_is_free, unique_root

README = Path(__file__).parent.parent / "README.md"

# (file contents or None for a missing file, what the one error line says)
BAD_CONFIGS: dict[str, tuple[str | bytes | None, str]] = {
    "misspelt key": ('{"prot": 1}', "unknown key 'prot' (did you mean 'port'?)"),
    "wrong type": ('{"port": "x"}', """key 'port': must be a whole number (got "x")"""),
    "impossible value": (
        '{"capacity_overrides": {"cores": -1}}',
        "key 'capacity_overrides.cores': must be at least 0 (got -1)",
    ),
    "missing file": (None, "cannot read config file {path}: No such file"),
    "empty file": ("", "config file {path} is empty"),
    "not JSON": ("port: 2504", "config file {path} is not JSON"),
    "not UTF-8": (b"\xff\xfe{}", "config file {path} is not UTF-8 text"),
    "port a string": ('{"port": "2504"}', "key 'port': must be a whole number"),
    "empty temp_root": ('{"temp_root": ""}', "key 'temp_root': must not be empty"),
    "empty task_user": ('{"task_user": ""}', "key 'task_user': must not be empty"),
    "empty token file": (
        '{"auth_token_file": ""}',
        "key 'auth_token_file': must not be empty",
    ),
    "empty tls file": (
        '{"tls_cert_file": "", "tls_key_file": "k.pem"}',
        "key 'tls_cert_file': must not be empty",
    ),
    "empty ip": ('{"ip": ""}', "key 'ip': must not be empty"),
    "cgroup_root a relative path": (
        '{"cgroup_root": "a/b"}',
        "cgroup_root 'a/b' must be one directory name",
    ),
}


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, case: str, daemon: bool
) -> None:
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    rest_port, grpc_port, root = free_port(), free_port(), unique_root()
    # Good flags over a bad file: the file is still refused.
    args = ["--config", str(path), "--grpc-port", str(grpc_port)]
    args += ["--cgroup-root", root, "--port", str(rest_port)]
    if daemon:
        args += [
            "-d",
            "--pidfile",
            str(tmp_path / "p"),
            "--log-file",
            str(tmp_path / "l"),
        ]

    done = subprocess.run([DAGGYR, *args], capture_output=True, text=True, timeout=60)
    pidfile = tmp_path / "p"
    if done.returncode == 0 and pidfile.exists():
        # A daemon that should never have started must not outlive the test.
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)

    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected.format(path=path) in lines[0]
    assert port_is_free(rest_port) and port_is_free(grpc_port)
    assert cgroup_dirs(root) == []
    assert not (tmp_path / "p").exists() and not (tmp_path / "l").exists()


def test_flags_override_the_file_however_it_spells_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"grpc-port": 3000, "port": 3001, "web-threads": 3}))
    config = load_config(str(path), {"grpc_port": 4000, "port": None})
    assert (config.grpc_port, config.port, config.web_threads) == (4000, 3001, 3)


def test_a_flag_never_hides_a_mistake_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"port": "2504", "cgroup_root": "."}')
    with pytest.raises(ConfigError, match=f"in {path}: key 'port'"):
        load_config(str(path), {"port": 0, "cgroup_root": "fine"})


def test_a_bad_flag_is_named_as_a_flag(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="in the command-line flags: key 'port'"):
        load_config(str(path), {"port": 70000})


def test_the_original_readme_config_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        '{"web-threads": 50, "port": 2504, "ip": "localhost",'
        ' "capacity_overrides": {"cores": 10, "memory_mb": 100}}'
    )
    config = load_config(str(path))
    assert (config.web_threads, config.port, config.ip) == (50, 2504, "localhost")
    assert config.capacity_overrides == CapacityOverrides(cores=10, memory_mb=100)


def test_a_key_set_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"port": 1, "port": 2}')
    with pytest.raises(ConfigError, match="sets key 'port' twice"):
        load_config(str(path))


def test_tokens_never_appear_in_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"auth_tokens": "s3cret-token"}')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "auth_tokens" in str(caught.value)
    assert "s3cret" not in str(caught.value)


async def test_ip_localhost_serves_both_protocols(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    runner = await make_runner(ip="localhost")
    server = runner.server
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://localhost:{server.rest_port}/ready") as response,
    ):
        assert response.status == 200
    async with grpc.aio.insecure_channel(f"localhost:{server.grpc_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_cores_zero_means_every_logical_cpu(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    runner = await make_runner(capacity_overrides={"cores": 0})
    status, body = await runner.rest("GET", "/api/v1/capacity")
    assert status == 200
    assert body["total"]["cores"] == os.cpu_count()


async def test_web_threads_sizes_the_pool_for_blocking_work(
    make_runner: Callable[..., Awaitable[Runner]],
) -> None:
    await make_runner(**{"web-threads": 3})
    loop = asyncio.get_running_loop()

    # Three jobs that each wait for the other two can only finish on three
    # threads at once; twelve more still use no more than three threads.
    meet = threading.Barrier(3, timeout=10)
    await asyncio.gather(*(loop.run_in_executor(None, meet.wait) for _ in range(3)))
    names = await asyncio.gather(
        *(
            loop.run_in_executor(None, lambda: threading.current_thread().name)
            for _ in range(12)
        )
    )
    assert len(set(names)) <= 3
    assert all(name.startswith("daggyr") for name in names)


def test_readme_documents_every_key() -> None:
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))
    keys = {field.alias or name for name, field in Config.model_fields.items()}
    keys |= {f"capacity_overrides.{name}" for name in CapacityOverrides.model_fields}
    assert keys - documented == set(), "keys missing from the README"
    assert documented - keys == set(), "README documents keys that do not exist"
