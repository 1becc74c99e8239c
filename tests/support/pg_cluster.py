"""A throwaway PostgreSQL cluster that a test may stop and start at will.

Tests that restart "the database" must not restart the server every other test is using:
this makes a cluster of its own with Debian's cluster tools (`pg_createcluster`,
`pg_ctlcluster`, `pg_dropcluster`, as in scripts/postgres.sh), on a free port, and drops
it afterwards.

Without those tools (or without the rights to use them) the test fails; it is skipped
only when QNA_ALLOW_NO_POSTGRES=1 is set, and never when CI is set: a suite that silently
skips its database tests passes while checking nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

_TOOLS = ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster", "psql")
_CONFIG_ROOT = Path("/etc/postgresql")


def _unavailable(reason: str) -> None:
    reason += " A throwaway PostgreSQL cluster is needed to test database restarts."
    if os.environ.get("CI") or not os.environ.get("QNA_ALLOW_NO_POSTGRES"):
        pytest.fail(reason + " Set QNA_ALLOW_NO_POSTGRES=1 to skip these tests locally.")
    pytest.skip(reason)


def installed_version() -> str:
    """The newest PostgreSQL major version with cluster configuration on this machine."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        _unavailable(f"PostgreSQL cluster tools are missing: {', '.join(missing)}.")
    versions = (
        sorted(
            (entry.name for entry in _CONFIG_ROOT.iterdir() if entry.name.isdigit()),
            key=int,
        )
        if _CONFIG_ROOT.is_dir()
        else []
    )
    if not versions:
        _unavailable(f"No PostgreSQL version is configured under {_CONFIG_ROOT}.")
    if os.geteuid() != 0:
        _unavailable("Creating a PostgreSQL cluster needs root (pg_createcluster).")
    return versions[-1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: Sequence[str], *, timeout: float = 60) -> str:
    completed = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return completed.stdout


class PgCluster:
    """One cluster: `url` reaches its database as a password-authenticated login role."""

    def __init__(self, version: str, name: str, port: int) -> None:
        self.version = version
        self.name = name
        self.port = port
        self.role = "qna_restart"
        self.password = uuid.uuid4().hex
        self.database = "qna"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{self.role}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def create(self) -> None:
        # fsync off: the cluster lives for one test; durability would only cost time.
        _run(
            [
                "pg_createcluster",
                self.version,
                self.name,
                "-p",
                str(self.port),
                "-o",
                "fsync=off",
                "--",
                "--no-sync",
            ]
        )
        self.start()
        self._psql(
            f"CREATE ROLE {self.role} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.role}",
        )

    def start(self) -> None:
        _run(["pg_ctlcluster", self.version, self.name, "start"])
        self._wait_until_accepting()

    def stop(self) -> None:
        # The default mode, fast: open connections are cut, as in a real restart.
        _run(["pg_ctlcluster", self.version, self.name, "stop"])

    def drop(self) -> None:
        _run(["pg_dropcluster", self.version, self.name, "--stop"])

    def exists(self) -> bool:
        return (_CONFIG_ROOT / self.version / self.name).is_dir()

    def is_online(self) -> bool:
        completed = subprocess.run(
            ["pg_ctlcluster", self.version, self.name, "status"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return completed.returncode == 0

    def _psql(self, *statements: str) -> None:
        command = ["runuser", "-u", "postgres", "--", "psql", "-v", "ON_ERROR_STOP=1", "-q"]
        command += ["-p", str(self.port)]
        for statement in statements:
            command += ["-c", statement]
        _run(command)

    def _wait_until_accepting(self, timeout: float = 30) -> None:
        give_up_at = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > give_up_at:
                    raise RuntimeError(
                        f"cluster {self.version}/{self.name} did not accept connections "
                        f"on port {self.port} within {timeout:g} s"
                    ) from None
                time.sleep(0.1)


@contextmanager
def throwaway_cluster() -> Iterator[PgCluster]:
    """A new, running cluster with one empty database; stopped and dropped afterwards."""
    version = installed_version()
    cluster = PgCluster(version, f"qna_restart_{uuid.uuid4().hex[:10]}", free_port())
    try:
        cluster.create()
        yield cluster
    finally:
        if cluster.exists():
            try:
                if cluster.is_online():
                    cluster.stop()
            finally:
                cluster.drop()
