"""`qna serve` as an operator runs it: gunicorn in a subprocess, real PostgreSQL, a local
OpenAI-compatible server, and a plain HTTP client on the other end."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from sqlalchemy.engine import make_url

from qna.adapters.sqlalchemy.database import sqlite_url
from qna.entrypoints.http import swagger_ui
from qna.entrypoints.http.server import METRICS_PREFIX, remove_abandoned_metrics_directories
from tests.e2e.helpers import settings_free_environ
from tests.support.databases import (
    BROKEN_SQLITE_FILES,
    WRONG_PASSWORD,
    broken_sqlite_file,
    migrate_as_a_newer_qna,
    with_missing_database,
    with_wrong_password,
)
from tests.support.fake_openai import DEFAULT_ANSWER, FakeOpenAI

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 15
# gunicorn finds the chunk size "zz" only when the view reads the body.
MALFORMED_CHUNKED_ASK = (
    b"POST /ask HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    reason: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
    ) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(
                method, path, body=body, headers=headers or {}, encode_chunked=chunked
            )
            return _reply(connection.getresponse())
        finally:
            connection.close()

    def connect(self) -> socket.socket:
        """A raw connection, for requests no HTTP client would send (see `read_reply`)."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def read_reply(sock: socket.socket) -> Reply:
    """The response to what a test wrote on a raw connection (`Server.connect`)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return _reply(response)


def _reply(response: http.client.HTTPResponse) -> Reply:
    return Reply(
        response.status,
        {name.lower(): value for name, value in response.getheaders()},
        response.read(),
        response.reason,
    )


def qna_command() -> list[str]:
    # The script next to this interpreter is the one the package installed.
    script = shutil.which("qna", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "qna"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(server: Server) -> None:
    give_up_at = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < give_up_at:
        if server.process.poll() is not None:
            pytest.fail(f"qna serve exited with {server.process.returncode}:\n{server.output()}")
        try:
            if server.request("GET", "/healthz").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"qna serve did not answer /healthz within {START_TIMEOUT_S} s:\n{server.output()}")


@pytest.fixture
def server(
    fake_openai: FakeOpenAI, postgres_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Server]:
    """`qna serve` with its default worker class, or the one a test passes indirectly."""
    worker_class = getattr(request, "param", "gevent")
    port = free_port()
    env = {
        **settings_free_environ(),
        "HOME": str(tmp_path / "home"),
        "DATABASE_URL": postgres_url,
        "OPENAI_BASE_URL": fake_openai.base_url,
        "QNA_LLM_MAX_ATTEMPTS": "1",
        # Shorter than Server.connect's 10 s: a body that stops arriving is answered.
        "QNA_BODY_TIMEOUT_S": "2",
    }
    marker = request.node.get_closest_marker("serve_env")
    env.update(marker.kwargs if marker else {})
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                *qna_command(),
                *("serve", "--port", str(port), "--workers", "2", "--threads", "8"),
                *("--worker-class", worker_class),
            ],
            env=env,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own process group, so that cleanup reaches the workers too.
            start_new_session=True,
        )
    running = Server(process, port, log)
    try:
        wait_until_healthy(running)
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_serve_answers_keeps_history_and_stops_on_sigterm(
    server: Server, fake_openai: FakeOpenAI
) -> None:
    assert server.request("GET", "/readyz").json() == {"status": "ready"}

    asked = server.request(
        "POST",
        "/ask",
        json.dumps({"question": QUESTION}).encode(),
        {"Content-Type": "application/json", "X-Request-ID": "e2e-1"},
    )
    assert asked.status == 201, asked.body
    record = asked.json()
    assert (record["question"], record["answer"]) == (QUESTION, DEFAULT_ANSWER)
    assert record["status"] == "answered"
    assert asked.headers["x-request-id"] == "e2e-1"
    assert fake_openai.calls == 1

    assert server.request("GET", urljoin("/ask", asked.headers["location"])).json() == record
    history = server.request("GET", "/questions?limit=5")
    assert history.status == 200
    assert history.json()["items"][0] == record

    # Two workers: /metrics adds up every worker's numbers, whichever one answers.
    for _ in range(4):
        metrics = server.request("GET", "/metrics").body.decode()
        assert 'qna_asks_total{outcome="answered"} 1.0' in metrics

    # gunicorn refuses this before the app sees it; the worker answers in JSON too.
    too_big = server.request("GET", "/healthz", headers={"X-Padding": "a" * 20_000})
    assert too_big.status == 431
    assert too_big.headers["content-type"] == "application/json"
    assert too_big.json()["error"]["code"] == "headers_too_large"
    assert set(too_big.json()) == {"error"}

    not_found = server.request("GET", "/nope")
    assert not_found.status == 404
    assert not_found.json()["error"]["code"] == "not_found"

    server.process.send_signal(signal.SIGTERM)
    try:
        exit_code = server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qna serve did not stop within {STOP_TIMEOUT_S} s:\n{server.output()}")
    assert exit_code == 0, server.output()
    assert "Traceback" not in server.output()


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGQUIT, 131)])
def test_a_fast_stop_is_told_by_the_exit_code_not_as_sigterms_0(
    server: Server, signum: int, exit_code: int
) -> None:
    # Ctrl-C and SIGQUIT cut off asks in flight; gunicorn exited 0 for them too, so a
    # script could not tell that from SIGTERM's drain.
    server.process.send_signal(signum)
    try:
        stopped_with = server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qna serve did not stop within {STOP_TIMEOUT_S} s:\n{server.output()}")
    assert stopped_with == exit_code, server.output()
    assert "Traceback" not in server.output()


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGQUIT, 131)])
def test_a_fast_stop_in_the_middle_of_sigterms_drain_is_told_too(
    server: Server, fake_openai: FakeOpenAI, signum: int, exit_code: int
) -> None:
    # During the drain gunicorn takes Ctrl-C off its queue itself and cuts the asks
    # off at once, but its handler never ran: the server exited 0, as if drained.
    fake_openai.latency = 20  # an ask the drain (30 s) would wait for
    outcome: list[BaseException | int] = []

    def ask() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            body = json.dumps({"question": "Long?"})
            connection.request("POST", "/ask", body, {"Content-Type": "application/json"})
            outcome.append(connection.getresponse().status)
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)
        finally:
            connection.close()

    asking = threading.Thread(target=ask)
    asking.start()
    deadline = time.monotonic() + 10
    while fake_openai.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_openai.calls == 1

    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    server.process.send_signal(signum)
    try:
        stopped_with = server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qna serve did not stop within {STOP_TIMEOUT_S} s:\n{server.output()}")
    asking.join(30)

    assert stopped_with == exit_code, server.output()
    # Cut off: no answer reached the asker.
    assert len(outcome) == 1 and not isinstance(outcome[0], int), outcome


def test_a_chunked_body_over_the_limit_is_413(server: Server, fake_openai: FakeOpenAI) -> None:
    # The first 64 KiB (the default limit) are a valid ask on their own.
    chunks = [b'{"question": "What is the capital of France?"}', b" " * 70_000]

    reply = server.request(
        "POST", "/ask", iter(chunks), {"Content-Type": "application/json"}, chunked=True
    )

    assert reply.status == 413, reply.body
    assert reply.json()["error"]["code"] == "payload_too_large"
    assert fake_openai.calls == 0


def test_a_body_declared_too_large_is_413_and_the_connection_closed(
    server: Server, fake_openai: FakeOpenAI
) -> None:
    # Refused from its Content-Length, unread: kept open, the connection would make
    # gunicorn read and throw away what the client goes on sending (here 10 MB) before
    # the next request, or wait out the keep-alive for bytes that never come.
    with server.connect() as sock:
        sock.sendall(
            b"POST /ask HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 10000000\r\n\r\n{"question": "Too long?"'
        )
        reply = read_reply(sock)
        sock.settimeout(3)  # the keep-alive timeout is 5 s
        after = sock.recv(1024)

    assert reply.status == 413, reply.body
    assert reply.json()["error"]["code"] == "payload_too_large"
    assert reply.headers.get("connection") == "close", reply.headers
    assert after == b"", after
    assert fake_openai.calls == 0


def test_a_malformed_chunked_body_is_400_not_a_server_error(
    server: Server, fake_openai: FakeOpenAI
) -> None:
    with server.connect() as sock:
        sock.sendall(MALFORMED_CHUNKED_ASK)
        reply = read_reply(sock)

    assert reply.status == 400, reply.body
    assert reply.json()["error"]["code"] == "bad_request"
    assert set(reply.json()) == {"error"}
    assert fake_openai.calls == 0
    assert "Traceback" not in server.output()
    assert "unhandled error" not in server.output()


@pytest.mark.parametrize("server", ["gevent", "gthread"], indirect=True)
def test_after_a_malformed_chunked_body_the_response_says_connection_close(
    server: Server,
) -> None:
    # Where the next request starts is unknown after a broken body, so gunicorn closes
    # the connection; a response saying keep-alive made a client (or a proxy's pool)
    # send its next request into a connection that was going away.
    with server.connect() as sock:
        sock.sendall(MALFORMED_CHUNKED_ASK)
        reply = read_reply(sock)
        after = sock.recv(1024)

    assert reply.status == 400
    assert reply.headers.get("connection") == "close", reply.headers
    assert after == b"", after  # closed, and no second response to the leftover bytes


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        # gunicorn's own 501 ("Bad Request"), code internal_error: the app answers
        # the Transfer-Encodings it is handed (gzip, chunked) 400, as README says.
        (
            b"POST /ask HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: x-foo, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST /ask HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Expect: 200-ok\r\nContent-Length: 2\r\n\r\n{}",
            417,
            "expectation_failed",
        ),
    ],
    ids=["bad-request-line", "long-uri", "long-header", "unknown-coding", "expectation"],
)
def test_what_gunicorn_refuses_itself_is_json_with_a_request_id(
    server: Server, request_bytes: bytes, status: int, code: str
) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes)
        reply = read_reply(sock)

    assert reply.status == status, reply.body
    # As RFC 9110 names them (Python's HTTPStatus keeps 414's older name).
    assert reply.reason == {414: "URI Too Long"}.get(status, HTTPStatus(status).phrase)
    assert reply.headers.get("content-type") == "application/json"
    assert reply.json()["error"]["code"] == code
    # The README: every response carries X-Request-ID.
    request_id = reply.headers.get("x-request-id", "")
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), reply.headers
    # ... and the log has a JSON line for every request, with its id to trace it by.
    logged = _log_entries(server)
    assert {
        "logger": "qna.http",
        "msg": "request",
        "status": status,
        "request_id": request_id,
    }.items() <= next(
        (entry for entry in logged if entry.get("request_id") == request_id), {}
    ).items()


def test_serve_on_loopback_answers_only_to_its_own_names(server: Server) -> None:
    # The default --host, 127.0.0.1: a web page that rebinds its own name to it would
    # otherwise read the history and ask the LLM, past CORS.
    refused = server.request("GET", "/questions", headers={"Host": "rebind.example:80"})
    assert refused.status == 421
    assert refused.json()["error"]["code"] == "unknown_host"
    assert server.request("GET", "/questions", headers={"Host": "localhost"}).status == 200


def test_a_local_clients_script_name_header_changes_no_path(server: Server) -> None:
    # gunicorn's default took SCRIPT_NAME from any client on 127.0.0.1: a prefix was
    # stripped (/x/questions answered 200), and a malformed one made a 500.
    assert server.request("GET", "/x/questions", headers={"SCRIPT_NAME": "/x"}).status == 404
    reply = server.request("GET", "/openapi.json", headers={"SCRIPT_NAME": '/"><svg>'})
    assert reply.status == 200
    assert reply.json()["servers"] == [{"url": "/"}]


@pytest.mark.serve_env(QNA_SEND_TIMEOUT_S="1")
def test_a_client_that_stops_reading_loses_its_connection(server: Server) -> None:
    # It held the connection (one of the worker's --connections) for as long as it
    # liked: a few hundred such, asking for /docs' largest file, took a worker down.
    asset = f"/docs/swagger-ui/{swagger_ui.VERSION}/swagger-ui-bundle.js"
    size = len(server.request("GET", asset).body)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET {asset} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode() * 10)
        time.sleep(3)  # reading nothing, past QNA_SEND_TIMEOUT_S
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(1 << 20):  # an EOF: the server closed it
            received += chunk

    assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received[:200]
    # What the kernels' buffers held when it was closed, not the ten responses.
    assert len(received) < 10 * size
    assert server.request("GET", "/healthz").status == 200


def _log_entries(server: Server) -> list[dict[str, Any]]:
    """Every line the server logged, each one read as JSON (the test fails on any other)."""
    deadline = time.monotonic() + 5  # the worker writes its line after the reply
    while True:
        lines = server.output().splitlines()
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                pytest.fail(f"not a JSON line in the log: {line!r}")
        if any(entry.get("msg") == "request" for entry in entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def test_gunicorns_own_lines_are_json_too(server: Server, postgres_url: str) -> None:
    entries = _log_entries(server)

    # Its own first line says what it serves, the database's password starred.
    [serving] = [entry for entry in entries if entry.get("msg") == "serving"]
    url = make_url(postgres_url)
    assert url.password and f":{url.password}@" not in json.dumps(serving)
    assert ":***@" in serving["database"]
    assert serving["database"].endswith(f"@{url.host}:{url.port}/{url.database}")
    assert (serving["auth"], serving["rate_limit"]) == ("off", "off")

    assert any(
        entry["logger"] == "gunicorn.error" and "Booting worker" in entry["msg"]
        for entry in entries
    )


@pytest.mark.parametrize("server", ["gevent", "gthread"], indirect=True)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_that_stops_arriving_is_408_and_its_connection_closed(
    server: Server, fake_openai: FakeOpenAI, framing: str
) -> None:
    # Headers sent, then the body stalled: the connection, and a place among the
    # worker's --connections, were held for good (a slowloris, with enough of them).
    head = b"POST /ask HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    if framing == "length":
        stalled = head + b'Content-Length: 100\r\n\r\n{"question":'
    else:
        stalled = head + b'Transfer-Encoding: chunked\r\n\r\n20\r\n{"question":'
    with server.connect() as sock:
        sock.sendall(stalled)
        reply = read_reply(sock)  # Server.connect gives up after 10 s
        after = sock.recv(1024)

    assert reply.status == 408, reply.body
    assert reply.json()["error"] == {
        "code": "request_timeout",
        "message": "The request body did not arrive within 2 s.",
    }
    assert reply.headers.get("connection") == "close"
    assert after == b""
    assert fake_openai.calls == 0
    assert server.request("GET", "/healthz").status == 200


def test_a_body_cut_short_of_its_content_length_is_not_asked(
    server: Server, fake_openai: FakeOpenAI
) -> None:
    # The client declares 100 bytes, sends a complete-looking JSON object of 23, and
    # stops sending: the request never arrived whole, so nothing may be asked or stored.
    with server.connect() as sock:
        sock.sendall(
            b"POST /ask HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"question":"cut short"}'
        )
        sock.shutdown(socket.SHUT_WR)
        reply = read_reply(sock)

    assert reply.status == 400, reply.body
    assert reply.json()["error"]["code"] == "bad_request"
    assert fake_openai.calls == 0
    # The server's database may hold other tests' records, never this one.
    history = server.request("GET", "/questions?limit=100").json()["items"]
    assert "cut short" not in [item["question"] for item in history]


def serve_refusing_to_start(tmp_path: Path, database_url: str) -> tuple[int, str]:
    """`qna serve` on `database_url`, expected to exit before it serves: its exit code
    and its output (the test fails if it is still running after START_TIMEOUT_S)."""
    env = {
        **settings_free_environ(),
        "HOME": str(tmp_path / "home"),
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",
    }
    process = subprocess.Popen(
        [*qna_command(), "serve", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"qna serve started:\n{output.decode(errors='replace')}")
    return process.returncode, output.decode(errors="replace")


@pytest.mark.parametrize("kind", [*BROKEN_SQLITE_FILES, "newer-qna", "directory"])
def test_serve_refuses_a_database_that_waiting_cannot_mend(tmp_path: Path, kind: str) -> None:
    # A database that is down is waited for (503 until it is back); a file that is not
    # a database, or a schema from a newer qna, would answer 503 for ever. A directory
    # that cannot be made (a file in its way) let it start, and every worker die.
    if kind == "newer-qna":
        url = sqlite_url(tmp_path / "qna.db")
        migrate_as_a_newer_qna(url)
    elif kind == "directory":
        (tmp_path / "a-file").write_text("")
        url = sqlite_url(tmp_path / "a-file" / "qna.db")
    else:
        url = broken_sqlite_file(tmp_path / "qna.db", kind)
    returncode, text_output = serve_refusing_to_start(tmp_path, url)

    assert returncode == 6, text_output
    assert "Traceback" not in text_output
    [line] = text_output.splitlines()
    assert "database" in line


@pytest.mark.parametrize(
    "wrong", [with_wrong_password, with_missing_database], ids=["password", "database-name"]
)
def test_serve_refuses_to_start_with_a_wrong_database_login(
    tmp_path: Path, postgres_url: str, wrong: Callable[[str], str]
) -> None:
    # It started, as for a database that is down, and answered 503 for ever.
    returncode, text_output = serve_refusing_to_start(tmp_path, wrong(postgres_url))

    assert returncode == 3, text_output
    [line] = text_output.splitlines()
    assert "DATABASE_URL" in line
    assert WRONG_PASSWORD not in line


def test_sighup_reloads_the_workers_and_the_server_keeps_serving(
    server: Server, fake_openai: FakeOpenAI
) -> None:
    # gunicorn's graceful reload (systemd's usual ExecReload): new workers start, the
    # old ones exit. A worker's exit must not take the metrics directory with it.
    assert server.request("GET", "/metrics").status == 200
    server.process.send_signal(signal.SIGHUP)
    give_up_at = time.monotonic() + START_TIMEOUT_S
    while (
        server.output().count("Booting worker") < 4 or server.output().count("Worker exiting") < 2
    ):
        if server.process.poll() is not None or time.monotonic() > give_up_at:
            pytest.fail(f"qna serve did not reload:\n{server.output()}")
        time.sleep(0.1)

    for _ in range(4):
        asked = server.request(
            "POST", "/ask", b'{"question": "hi"}', {"Content-Type": "application/json"}
        )
        assert asked.status == 201, asked.body
    metrics = server.request("GET", "/metrics").body.decode()
    answered = re.search(r'^qna_asks_total\{outcome="answered"\} (\S+)$', metrics, re.MULTILINE)
    assert answered is not None, metrics
    assert float(answered.group(1)) == 4
    assert server.process.poll() is None


def test_a_metrics_directory_is_removed_once_its_server_is_gone(tmp_path: Path) -> None:
    # atexit never runs in a server killed outright (SIGKILL, the OOM killer): the
    # next server to start removes what it left in the temporary directory.
    def made_by_a_process(then: str) -> tuple[subprocess.Popen[str], str]:
        maker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys\n"
                "from qna.entrypoints.http.server import make_metrics_directory\n"
                f"print(make_metrics_directory({str(tmp_path)!r}), flush=True)\n"
                f"{then}\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert maker.stdout is not None
        return maker, maker.stdout.readline().strip()

    killed, abandoned = made_by_a_process("sys.stdin.read()")
    killed.kill()
    killed.wait(timeout=10)
    running, in_use = made_by_a_process("sys.stdin.read()")
    older = tmp_path / f"{METRICS_PREFIX}from-an-older-qna"
    older.mkdir()
    try:
        remove_abandoned_metrics_directories(str(tmp_path))

        assert not Path(abandoned).exists()
        assert Path(in_use).is_dir()  # its server still runs
        assert older.is_dir()  # no lock to tell whether its server runs
    finally:
        running.kill()
        running.wait(timeout=10)
    remove_abandoned_metrics_directories(str(tmp_path))
    assert not Path(in_use).exists()
