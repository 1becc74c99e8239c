"""`qna serve` run as a user runs it, for end-to-end tests and the throughput tests:
real processes on free ports, terminated (then killed) on the way out."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import settings_free_environ
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg_cluster import free_port

QNA = Path(sys.executable).parent / "qna"
START_TIMEOUT_S = 30
GRACEFUL_TIMEOUT_S = 10


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until_healthy(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    give_up_at = time.monotonic() + timeout
    while time.monotonic() < give_up_at:
        if server.process.poll() is not None:
            pytest.fail(f"qna serve exited {server.process.returncode}:\n{server.output()}")
        try:
            if requests.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    pytest.fail(f"qna serve did not answer /healthz within {timeout:g} s:\n{server.output()}")


@contextmanager
def serving_many(count: int, env: dict[str, str], logs: Path, *args: str) -> Iterator[list[Server]]:
    """`count` running `qna serve` processes, started together; each is terminated (then
    killed) on the way out whatever happens."""
    servers: list[Server] = []
    try:
        for index in range(count):
            port = free_port()
            log = logs / f"serve-{index}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    [str(QNA), "serve", "--port", str(port), *args],
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            servers.append(Server(process, f"http://127.0.0.1:{port}", log))
        for server in servers:
            wait_until_healthy(server)
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.terminate()
        for server in servers:
            try:
                server.process.wait(timeout=GRACEFUL_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=10)


@contextmanager
def serving(env: dict[str, str], logs: Path, *args: str) -> Iterator[Server]:
    with serving_many(1, env, logs, *args) as [server]:
        yield server


def serve_env(database_url: str, fake: FakeOpenAI, **settings: str) -> dict[str, str]:
    return {
        **settings_free_environ(),
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": fake.base_url,
        "QNA_MODEL": "gpt-test",
        "QNA_LOG_LEVEL": "WARNING",
        **settings,
    }
