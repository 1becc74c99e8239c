"""Nothing lost, with `qna serve` run as a user runs it: real processes, real sockets.

Two servers racing on one idempotency key, SIGTERM during an ask, a burst of concurrent
asks while the LLM fails at random, and a database that is down when the server starts
and restarts under it.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.e2e.helpers import settings_free_environ
from tests.support.databases import scratch_database
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg_cluster import PgCluster, throwaway_cluster
from tests.support.serving import (
    GRACEFUL_TIMEOUT_S,
    Server,
    serve_env,
    serving,
    serving_many,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

QUESTION = "What is the capital of France?"


def assert_json_error(response: requests.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"], response.text
    assert isinstance(error["message"], str) and error["message"], response.text
    if code is not None:
        assert error["code"] == code, response.text
    return str(error["code"])


def table(url: str, where: str = "TRUE", **params: Any) -> list[dict[str, Any]]:
    """Rows of `qn_a`, read with plain SQL rather than through qna's own code."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            result = connection.execute(
                text(
                    "SELECT id, question, status, error_kind, idempotency_key"
                    f" FROM qn_a WHERE {where}"
                ),
                params,
            )
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


@pytest.fixture
def database(postgres_server_url: str) -> Iterator[str]:
    """A new, empty database: `qna serve` migrates it as it starts."""
    with scratch_database(postgres_server_url) as url:
        yield url


# -- (a) two servers, one key ---------------------------------------------------------------------


def test_two_servers_racing_on_one_key_ask_the_llm_once(
    database: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.5
    env = serve_env(database, fake_openai)
    per_server = 4
    key = "order-7f3a"
    with serving_many(2, env, tmp_path, "--workers", "1", "--threads", "8") as [a, b]:
        targets = [a.url, b.url] * per_server
        barrier = threading.Barrier(len(targets))

        def fire(url: str) -> requests.Response:
            barrier.wait(timeout=10)
            return requests.post(
                f"{url}/ask",
                json={"question": QUESTION},
                headers={"Idempotency-Key": key},
                timeout=60,
            )

        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            responses = list(pool.map(fire, targets))

    # The default QNA_IDEMPOTENCY_WAIT_S (30 s) outlasts the one real ask: nobody gets
    # 409 idempotency_key_in_flight; every request waits and gets the one record.
    assert [r.status_code for r in responses] == [201] * len(targets), [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert fake_openai.calls == 1
    held = table(database, "idempotency_key LIKE :pattern", pattern=f"%{key}")
    assert len(held) == 1
    assert held[0]["status"] == "answered"
    assert str(held[0]["id"]) == responses[0].json()["id"]
    assert len(table(database)) == 1


# -- (b) graceful shutdown ------------------------------------------------------------------------


WORKER_CLASSES = pytest.mark.parametrize("worker_class", ["gevent", "gthread"])


def ask_in_flight(pool: ThreadPoolExecutor, server: Server, fake: FakeOpenAI) -> Future[Any]:
    """An ask sent from `pool`, once the LLM has it."""
    in_flight = pool.submit(
        requests.post, f"{server.url}/ask", json={"question": QUESTION}, timeout=30
    )
    deadline = time.monotonic() + 5
    while fake.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.calls == 1, "the ask never reached the LLM"
    return in_flight


@WORKER_CLASSES
def test_sigterm_lets_the_ask_in_flight_finish_and_exits_0(
    database: str, fake_openai: FakeOpenAI, tmp_path: Path, worker_class: str
) -> None:
    fake_openai.latency = 2.0
    env = serve_env(database, fake_openai)
    args = (
        *("--workers", "1", "--worker-class", worker_class, "--threads", "4"),
        *("--graceful-timeout", str(GRACEFUL_TIMEOUT_S)),
    )
    with serving(env, tmp_path, *args) as server:
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = ask_in_flight(pool, server, fake_openai)
            time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            response = in_flight.result(timeout=30)
        returncode = server.process.wait(timeout=GRACEFUL_TIMEOUT_S + 5)

    assert response.status_code == 201, response.text
    assert response.json()["status"] == "answered"
    assert returncode == 0, server.output()
    assert "graceful timeout" not in server.output()  # nothing was cut off
    [row] = table(database)
    assert UUID(str(row["id"])) == UUID(response.json()["id"])
    assert row["status"] == "answered"


@WORKER_CLASSES
def test_an_ask_outlasting_the_graceful_timeout_is_cut_off_and_the_log_says_so(
    database: str, fake_openai: FakeOpenAI, tmp_path: Path, worker_class: str
) -> None:
    fake_openai.latency = 30.0
    env = serve_env(database, fake_openai)
    args = ("--workers", "1", "--worker-class", worker_class, "--graceful-timeout", "1")
    with serving(env, tmp_path, *args) as server, ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = ask_in_flight(pool, server, fake_openai)
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(timeout=15)
        with pytest.raises(requests.ConnectionError):
            in_flight.result(timeout=30)

    assert returncode == 0, server.output()  # as README says: the drain's exit
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    [warning] = [line for line in lines if "graceful timeout" in line["msg"]]
    assert warning["level"] == "warning"
    assert warning["msg"] == (
        "graceful timeout (1 s) up: killed 1 busy worker(s); asks in flight cut off"
    )
    [row] = table(database)
    assert row["status"] == "pending"  # until it counts as abandoned


# -- (c) a burst of concurrent asks under random LLM failures -------------------------------------


@WORKER_CLASSES
def test_a_hundred_concurrent_asks_are_all_stored(
    database: str, fake_openai: FakeOpenAI, tmp_path: Path, worker_class: str
) -> None:
    n = 100
    fake_openai.latency = 0.2
    fake_openai.failure_rate = 0.3
    fake_openai.failure_statuses = (429, 503)
    env = serve_env(database, fake_openai, QNA_LLM_MAX_ATTEMPTS="4")
    questions = [f"Concurrent question {i}?" for i in range(n)]
    args = ("--workers", "2", "--worker-class", worker_class, "--threads", "64")
    with serving(env, tmp_path, *args) as server:

        def one(question: str) -> requests.Response:
            return requests.post(f"{server.url}/ask", json={"question": question}, timeout=60)

        with ThreadPoolExecutor(max_workers=n) as pool:
            responses = list(pool.map(one, questions))

    answered = [r for r in responses if r.status_code == 201]
    failed = [r for r in responses if r.status_code != 201]
    assert len(answered) >= 95, [r.text for r in failed]
    for response in failed:
        assert response.status_code >= 500, response.text
        assert_json_error(response, response.status_code)
    stored = table(database)
    assert len(stored) == n
    assert sorted(row["question"] for row in stored) == sorted(questions)
    assert sum(row["status"] == "answered" for row in stored) == len(answered)
    assert sum(row["status"] == "failed" for row in stored) == len(failed)
    assert all(row["status"] != "pending" for row in stored)


# -- the database is down at start, then restarts under the server --------------------------------


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    with throwaway_cluster() as cluster:
        yield cluster


def test_the_server_starts_without_its_database_and_rides_out_a_restart(
    cluster: PgCluster, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cluster.stop()
    env = serve_env(cluster.url, fake_openai, QNA_DB_CONNECT_TIMEOUT_S="2")
    with serving(env, tmp_path, "--workers", "1", "--threads", "4") as server:
        # Up, alive, not ready, and saying why in JSON.
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert_json_error(
            requests.get(f"{server.url}/readyz", timeout=10), 503, "database_unavailable"
        )
        down = requests.post(f"{server.url}/ask", json={"question": "Too early?"}, timeout=10)
        assert_json_error(down, 503, "database_unavailable")
        assert int(down.headers["Retry-After"]) >= 1
        assert fake_openai.calls == 0

        cluster.start()
        first = requests.post(f"{server.url}/ask", json={"question": "First?"}, timeout=30)
        assert first.status_code == 201, first.text  # the schema was migrated on demand
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200

        cluster.stop()
        during = requests.post(f"{server.url}/ask", json={"question": "During?"}, timeout=10)
        assert_json_error(during, 503, "database_unavailable")
        assert_json_error(
            requests.get(f"{server.url}/readyz", timeout=10), 503, "database_unavailable"
        )

        cluster.start()
        after = requests.post(f"{server.url}/ask", json={"question": "After?"}, timeout=30)
        assert after.status_code == 201, after.text  # same process: the pool healed itself
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert server.process.poll() is None

    assert fake_openai.calls == 2
    assert sorted((row["question"], row["status"]) for row in table(cluster.url)) == [
        ("After?", "answered"),
        ("First?", "answered"),
    ]
    # The master said why it started without migrating, in a JSON line as every log.
    [said] = [
        json.loads(line)
        for line in server.output().splitlines()
        if "database not ready at start" in line
    ]
    assert (said["level"], said["logger"]) == ("warning", "qna.serve")


@pytest.fixture
def silent_database_url() -> Iterator[str]:
    """A "database" that accepts TCP connections and never says a word: a hung server,
    or a proxy in front of a dead one."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        yield f"postgresql://qna:qna@127.0.0.1:{port}/qna?sslmode=disable"


@WORKER_CLASSES
def test_a_database_that_never_answers_is_a_503_within_the_connect_timeout(
    silent_database_url: str, fake_openai: FakeOpenAI, tmp_path: Path, worker_class: str
) -> None:
    # Under gevent, psycopg2 connects asynchronously and libpq's own connect_timeout
    # does not apply: without our wait callback's limit this ask would hang for good.
    env = serve_env(silent_database_url, fake_openai, QNA_DB_CONNECT_TIMEOUT_S="1")
    args = ("--workers", "1", "--worker-class", worker_class, "--threads", "4")
    with serving(env, tmp_path, *args) as server:
        started = time.monotonic()
        response = requests.post(f"{server.url}/ask", json={"question": "Hello?"}, timeout=30)
        waited = time.monotonic() - started

    assert_json_error(response, 503, "database_unavailable")
    assert waited < 15  # a bound on a hang, not a speed claim: the limit is 1 s per wait
    assert fake_openai.calls == 0


# -- gevent workers and the HTTPS stack ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def https_openai(tls_files: tuple[Path, Path]) -> Iterator[FakeOpenAI]:
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with FakeOpenAI(ssl_context=context) as fake:
        yield fake


@pytest.mark.parametrize("client", ["http", "openai"])
def test_gevent_workers_ask_an_https_llm_with_either_client(
    database: str,
    https_openai: FakeOpenAI,
    tls_files: tuple[Path, Path],
    tmp_path: Path,
    client: str,
) -> None:
    # The master must not import the HTTP/TLS stack before the workers patch it: a
    # urllib3 imported there kept the unpatched SSLContext and every HTTPS ask failed.
    cert, _ = tls_files
    assert https_openai.base_url.startswith("https://")
    env = serve_env(database, https_openai, QNA_LLM_CLIENT=client, QNA_LLM_MAX_ATTEMPTS="1")
    env["SSL_CERT_FILE"] = str(cert)  # trusted by urllib3 and httpx alike
    with serving(env, tmp_path, "--workers", "1", "--worker-class", "gevent") as server:
        responses = [
            requests.post(f"{server.url}/ask", json={"question": f"Q{i}?"}, timeout=30)
            for i in range(2)
        ]

    assert [r.status_code for r in responses] == [201, 201], responses[0].text
    assert https_openai.calls == 2
    assert {row["status"] for row in table(database)} == {"answered"}


def test_the_servers_master_leaves_the_http_stack_to_its_workers(tmp_path: Path) -> None:
    """What `qna serve` runs before forking imports no HTTP client (see the test above)."""
    script = (
        "import sys\n"
        "from qna.config import Settings\n"
        "from qna.entrypoints.http import server\n"
        "server.migrate_before_serving(Settings())\n"
        "print(sorted(m for m in ('urllib3', 'openai', 'httpx2', 'httpcore2', 'httpx',"
        " 'geventhttpclient')"
        " if m in sys.modules))\n"
    )
    env = {
        **settings_free_environ(),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'qna.db'}",
        "OPENAI_BASE_URL": "https://127.0.0.1:9/v1",
        "QNA_LLM_CLIENT": "http",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
