"""The SDK's transports (urllib3's, and green_transport as in gevent workers) and the
http client's two ways of sending, over real sockets, where they could differ from
httpx's own: odd bytes on the wire, requests they cannot send, timeouts, and what the
SDK reads back.

A raw socket server stands in for the LLM here: the scriptable fake (aiohttp) cannot send
a header with a non-ASCII byte, nor sit on a request without reading it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx2
import openai
import pytest

from qna.adapters import openai_llm
from qna.adapters.green_http import ExchangeFailed, GreenHttp
from qna.adapters.green_transport import GreenTransport
from qna.adapters.http_llm import HttpLLM
from qna.adapters.openai_llm import OpenAILLM
from qna.adapters.urllib3_transport import Urllib3Transport
from qna.domain.errors import LLMUnavailable
from tests.support.fake_openai import Delay, Drop, FakeOpenAI

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi?"}]}).encode()
BODY = json.dumps(
    {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
        ],
    }
).encode()


class RawServer:
    """Answers every request on 127.0.0.1 with `BODY` and `extra_headers`, and keeps the
    head of each request it read; with `read=False` it accepts and never reads."""

    def __init__(
        self,
        *,
        extra_headers: bytes = b"",
        read: bool = True,
        close_after: bool = False,
        interim: bytes = b"",
    ) -> None:
        self.extra_headers = extra_headers
        #: Sent before each answer: an interim response (103 Early Hints, say).
        self.interim = interim
        self.read = read
        #: Close each connection after one answer, with no word (no Connection: close),
        #: as a server whose idle timeout ran out does; `closed` counts them.
        self.close_after = close_after
        self.closed = threading.Semaphore(0)
        self.heads: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            if self.read:
                threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        stream = connection.makefile("rb")
        try:
            while head := stream.readline():
                while (line := stream.readline()) not in (b"\r\n", b""):
                    head += line
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                stream.read(length)
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + self.extra_headers
                    + b"Content-Length: %d\r\n\r\n" % len(BODY)
                )
                if self.interim:
                    # Each part on its own, as a client reading the first may see them.
                    for part in (self.interim, head):
                        connection.sendall(part)
                        time.sleep(0.05)
                    connection.sendall(BODY)
                else:
                    connection.sendall(head + BODY)
                if self.close_after:
                    # shutdown() sends the FIN now: close() alone leaves the socket open
                    # while `stream` refers to it, until this function returns, after
                    # `closed` said it was closed (and a client reusing the connection
                    # in between met a reset, not a closed connection).
                    connection.shutdown(socket.SHUT_RDWR)
                    connection.close()
                    self.closed.release()
                    return
        except OSError:
            return


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    made: list[RawServer] = []

    def make(**options: object) -> RawServer:
        server = RawServer(**options)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


TRANSPORTS = [Urllib3Transport, GreenTransport]
#: Whether the adapters send through green_http, as in gevent workers, or urllib3.
GREEN = pytest.mark.parametrize("green", [False, True], ids=["urllib3", "green"])


@pytest.fixture(params=TRANSPORTS, ids=["urllib3", "green"])
def transport(request: pytest.FixtureRequest) -> type[httpx2.BaseTransport]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def http_client(transport: Callable[..., httpx2.BaseTransport]) -> Iterator[httpx2.Client]:
    client = httpx2.Client(transport=transport(max_connections=4))
    yield client
    client.close()


def make_llm(base_url: str, **overrides: object) -> OpenAILLM:
    options: dict[str, object] = {
        "api_key": "sk-test",
        "base_url": base_url,
        "model": "m",
        "connect_timeout": 1.0,
        "request_timeout": 3.0,
        "deadline": 5.0,
        "max_attempts": 1,
    }
    options.update(overrides)
    return OpenAILLM(**options)  # type: ignore[arg-type]


def ask_twice(server: RawServer, ask: Callable[[], object]) -> None:
    ask()
    assert server.closed.acquire(timeout=5)  # the server has closed the kept connection
    ask()


def test_a_kept_connection_the_server_closed_is_not_reused(
    raw_server: Callable[..., RawServer], http_client: httpx2.Client
) -> None:
    # The transport does not retry: a request sent on the dead connection would fail.
    server = raw_server(close_after=True)

    ask_twice(server, lambda: http_client.post(f"{server.url}/chat/completions", content=b"{}"))

    assert len(server.heads) == 2


@GREEN
def test_the_http_client_does_not_reuse_a_connection_the_server_closed(
    raw_server: Callable[..., RawServer], green: bool
) -> None:
    server = raw_server(close_after=True)
    llm = HttpLLM(
        green=green,
        api_key="sk-test",
        base_url=server.url,
        model="m",
        connect_timeout=1.0,
        request_timeout=3.0,
        deadline=5.0,
        max_attempts=1,
    )

    ask_twice(server, lambda: llm.complete("Hi?"))

    assert len(server.heads) == 2


@pytest.mark.usefixtures("proxy_env")
def test_the_sdk_sends_through_it_when_no_proxy_is_set() -> None:
    client = openai_llm._http_client(green=False)
    try:
        assert isinstance(client._transport, Urllib3Transport)
    finally:
        client.close()


@GREEN
def test_a_header_with_any_byte_in_it_is_read(
    raw_server: Callable[..., RawServer], green: bool
) -> None:
    server = raw_server(extra_headers=b"X-Served-By: caf\xc3\xa9\r\n")

    assert make_llm(server.url, green=green).complete("Hi?").text == "hi"


@pytest.mark.parametrize("adapter", [OpenAILLM, HttpLLM])
@GREEN
def test_a_key_that_cannot_be_sent_is_a_failure_to_reach_the_llm(
    raw_server: Callable[..., RawServer], adapter: type[OpenAILLM | HttpLLM], green: bool
) -> None:
    # Not "answered with a bad body": nothing was sent, let alone answered.
    server = raw_server()
    llm = adapter(api_key="sk-test\n", base_url=server.url, model="m", green=green)

    with pytest.raises(LLMUnavailable):
        llm.complete("Hi?")
    assert server.heads == []


def test_a_request_without_a_body_says_no_content_length(
    raw_server: Callable[..., RawServer], http_client: httpx2.Client
) -> None:
    server = raw_server()

    http_client.get(f"{server.url}/models")

    assert b"content-length" not in server.heads[0].lower()


def test_the_response_is_timed(
    raw_server: Callable[..., RawServer], http_client: httpx2.Client
) -> None:
    server = raw_server()

    response = http_client.post(f"{server.url}/chat/completions", content=b"{}")

    assert response.elapsed.total_seconds() > 0
    assert response.json()["id"] == "chatcmpl-raw"


def test_a_send_that_times_out_is_a_timeout(
    raw_server: Callable[..., RawServer], transport: Callable[..., httpx2.BaseTransport]
) -> None:
    # The server never reads: 8 MB fill every buffer on the way, and sending stalls.
    server = raw_server(read=False)
    client = openai.OpenAI(
        api_key="sk-test",
        base_url=server.url,
        max_retries=0,
        http_client=httpx2.Client(transport=transport(max_connections=4)),
    )

    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x" * 8_000_000}],
            timeout=openai.Timeout(3.0, connect=0.5),
        )
    client.close()


def test_green_http_gives_back_the_connection_of_every_failed_exchange() -> None:
    # Two connections at most: had a timed-out or dropped exchange kept its place in the
    # pool, the last requests would wait for a connection until they timed out.
    with FakeOpenAI() as fake:
        server = GreenHttp("http", "127.0.0.1", fake.port, connect_timeout=1.0, pool_size=2)
        fake.script(Delay(5), Delay(5), Drop(), Drop())

        def ask(timeout: float = 5.0) -> int:
            headers = [("Content-Type", "application/json")]
            return server.request("POST", "/v1/chat/completions", headers, CHAT, timeout).status

        try:
            for _ in range(2):
                with pytest.raises(TimeoutError):
                    ask(timeout=0.3)
            for _ in range(2):
                with pytest.raises(ExchangeFailed):
                    ask()
            statuses = [ask() for _ in range(3)]
        finally:
            server.close()

    assert statuses == [200] * 3


@pytest.mark.parametrize("adapter", [OpenAILLM, HttpLLM])
def test_green_http_reads_the_final_response_after_an_interim_one(
    raw_server: Callable[..., RawServer], adapter: type[OpenAILLM | HttpLLM]
) -> None:
    # geventhttpclient gave the socket back to the pool at the end of the 103, while
    # the 200 was still to be read from it: the body came back cut, and the next ask
    # took the same socket.
    server = raw_server(interim=b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
    llm = adapter(api_key="sk-test", base_url=server.url, model="m", green=True, max_attempts=1)
    try:
        answers = [llm.complete(f"Q{i}?").text for i in range(3)]
    finally:
        llm.close()

    assert answers == ["hi"] * 3
    assert len(server.heads) == 3


def test_green_http_keeps_its_time_limit_across_a_servers_addresses() -> None:
    # The first address never completes a connection (its backlog is full), the second
    # accepts and never answers. The limit ran out while connecting to the first; as an
    # OSError it was taken for that address failing, and the second was waited on for
    # ever.
    with (
        socket.create_server(("127.0.0.1", 0), backlog=0) as full,
        socket.create_server(("127.0.0.1", 0)) as silent,
        socket.create_connection(full.getsockname()),
    ):
        server = GreenHttp("http", "llm.example", 80, connect_timeout=30.0)
        server._pool._resolve = lambda: [  # type: ignore[method-assign]
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", full.getsockname()),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", silent.getsockname()),
        ]
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                server.request("POST", "/v1/chat/completions", [], CHAT, timeout=1.0)
        finally:
            server.close()

    # Well before the connect timeout would have ended the first address's try (and
    # the second, silent, would still be waited on).
    assert time.monotonic() - started < 15


def test_green_http_after_close_is_a_failure_to_reach_the_llm(
    raw_server: Callable[..., RawServer],
) -> None:
    # Not geventhttpclient's RuntimeError("connection pool closed") out of the ask.
    server = raw_server()
    llm = HttpLLM(api_key="sk-test", base_url=server.url, model="m", green=True, max_attempts=1)
    llm.close()

    with pytest.raises(LLMUnavailable):
        llm.complete("Hi?")


def test_a_url_urllib3_would_encode_goes_through_urllib3() -> None:
    # green_http sends the request target as given: a space or an è would go out raw.
    for path in ("/my models/v1", "/mod\u00e8les/v1"):
        llm = HttpLLM(api_key="k", base_url=f"http://127.0.0.1:9{path}", model="m", green=True)
        assert llm._green is None, path
        llm.close()
    llm = HttpLLM(api_key="k", base_url="http://127.0.0.1:9/v1", model="m", green=True)
    assert llm._green is not None
    llm.close()
