"""A throwaway Redis server of the test's own, on a free port, that it may stop and start.

For the rate limit's shared store (`QNA_RATE_LIMIT_STORAGE=redis://...`). Without a
`redis-server` on PATH (scripts/test installs Debian's) the test fails; it is skipped
only when QNA_ALLOW_NO_REDIS=1 is set, and never when CI is set: a suite that silently
skips these tests passes while checking nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.pg_cluster import free_port

START_TIMEOUT_S = 10


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        log = self._workdir / "redis.log"
        with log.open("ab") as sink:
            self._process = subprocess.Popen(
                # No persistence: a restarted server starts with no counters.
                [
                    *(binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(self._workdir)),
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        give_up_at = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self._process.poll() is not None or time.monotonic() > give_up_at:
                self.stop()
                pytest.fail(f"redis-server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        reason = "No redis-server on PATH (apt-get install redis-server; scripts/test does)."
        if os.environ.get("CI") or not os.environ.get("QNA_ALLOW_NO_REDIS"):
            pytest.fail(reason + " Set QNA_ALLOW_NO_REDIS=1 to skip these tests locally.")
        pytest.skip(reason)
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def silent_server() -> Iterator[str]:
    """A `redis://` URL whose server takes connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the handshakes; nothing reads
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}"
