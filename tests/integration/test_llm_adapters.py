"""Both LLM adapters — OpenAILLM through the real SDK, HttpLLM through urllib3 and, as in
`qna serve`'s gevent workers, through green_http — over real HTTP, against a local
OpenAI-compatible server. Every test runs once per adapter: they must ask the same thing
and report every failure in the same words.

Nothing in the SDK or urllib3 is patched: the fake server misbehaves on cue, and the
adapter's sleep and clock are replaced so retries cost no time and deadlines are
checked exactly.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any

import gevent
import pytest

from qna.adapters import chat_completions
from qna.adapters.chat_completions import ChatCompletionsLLM
from qna.adapters.http_llm import HttpLLM
from qna.adapters.openai_llm import OpenAILLM
from qna.application.ports import Completion
from qna.domain.errors import (
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
)
from tests.support.fake_openai import (
    DEFAULT_ANSWER,
    Delay,
    Drop,
    FakeOpenAI,
    Raw,
    Reply,
    Status,
    Step,
    chat_completion,
)

MODEL = "gpt-4o-mini"
API_KEY = "sk-test-0123456789abcdefSECRET"


class FakeTime:
    """A clock that only moves when the adapter sleeps, and a record of the sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    server.reset()
    yield server
    server.reset()
    server.latency = 0.0
    server.answer = DEFAULT_ANSWER


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


class GreenOpenAILLM(OpenAILLM):
    """OpenAILLM as `qna serve`'s gevent workers build it (through green_transport).
    gevent's sockets need no monkey-patching: they wait in this thread's gevent hub."""

    def __init__(self, **options: Any) -> None:
        super().__init__(green=True, **options)


class GreenHttpLLM(HttpLLM):
    """HttpLLM as `qna serve`'s gevent workers build it (through green_http)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(green=True, **options)


GREEN_ADAPTERS = (GreenOpenAILLM, GreenHttpLLM)
MakeLLM = Callable[..., ChatCompletionsLLM]
ADAPTERS = [OpenAILLM, GreenOpenAILLM, HttpLLM, GreenHttpLLM]


@pytest.fixture(params=ADAPTERS, ids=["sdk", "sdk-green", "http", "http-green"])
def adapter(request: pytest.FixtureRequest) -> type[ChatCompletionsLLM]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def make_llm(
    fake: FakeOpenAI, fake_time: FakeTime, adapter: type[ChatCompletionsLLM]
) -> Iterator[MakeLLM]:
    made: list[ChatCompletionsLLM] = []

    def make(**overrides: Any) -> ChatCompletionsLLM:
        options: dict[str, Any] = {
            "api_key": API_KEY,
            "base_url": fake.base_url,
            "model": MODEL,
            "request_timeout": 5.0,
            "deadline": 30.0,
            "max_attempts": 3,
            "sleep": fake_time.sleep,
            "clock": fake_time.clock,
        }
        options.update(overrides)
        llm = adapter(**options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def raw_json(body: object) -> Raw:
    return Raw(200, json.dumps(body).encode())


# -- answers ------------------------------------------------------------------------------


def test_answers_with_text_model_and_tokens(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Reply(model="gpt-4o-mini-2024-07-18", prompt_tokens=12, completion_tokens=7))

    completion = make_llm().complete("What is the capital of France?")

    assert completion == Completion(
        text=DEFAULT_ANSWER,
        model="gpt-4o-mini-2024-07-18",
        prompt_tokens=12,
        completion_tokens=7,
        finish_reason="stop",
    )
    assert fake.calls == 1
    assert fake.requests == [
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
    ]
    assert fake.authorizations == [f"Bearer {API_KEY}"]


def test_falls_back_to_its_own_model_and_no_tokens_when_the_server_omits_them(
    fake: FakeOpenAI, make_llm: MakeLLM
) -> None:
    body = chat_completion(text="Forty-two.", model="")
    del body["usage"]
    del body["choices"][0]["finish_reason"]
    fake.script(raw_json(body))

    completion = make_llm().complete("Meaning?")

    assert completion == Completion(text="Forty-two.", model=MODEL)


@pytest.mark.parametrize("reason", ["length", "content_filter", "tool_calls"])
def test_says_why_the_llm_stopped(fake: FakeOpenAI, make_llm: MakeLLM, reason: str) -> None:
    fake.script(Reply(text="The first three primes are 2, 3 and", finish_reason=reason))

    completion = make_llm().complete("Primes?")

    assert completion.text == "The first three primes are 2, 3 and"
    assert completion.finish_reason == reason


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        (None, None),
        ("", None),
        (7, None),
        (["length"], None),
        ("x" * 100, "x" * 64),  # as the column holds it
        ("stop\u0000", "stop\ufffd"),
    ],
    ids=["null", "empty", "number", "list", "too-long", "nul"],
)
def test_a_finish_reason_is_kept_only_as_storable_text(
    fake: FakeOpenAI, make_llm: MakeLLM, reason: object, kept: str | None
) -> None:
    body = chat_completion(text="Yes.", model=MODEL)
    body["choices"][0]["finish_reason"] = reason
    fake.script(raw_json(body))

    assert make_llm().complete("Q?").finish_reason == kept


@pytest.mark.parametrize(
    ("reason", "why"),
    [
        ("length", "its token limit ran out before it wrote any"),
        ("content_filter", "its content filter withheld it"),
    ],
)
def test_an_empty_answer_says_why_when_the_llm_did(
    fake: FakeOpenAI, make_llm: MakeLLM, reason: str, why: str
) -> None:
    # A reasoning model can spend its whole token limit thinking, and answer nothing.
    fake.script(raw_json(chat_completion(text="", model=MODEL, finish_reason=reason)))

    with pytest.raises(LLMBadResponse) as caught:
        make_llm().complete("Q?")

    assert caught.value.message == (
        f"The LLM at {fake.base_url} answered with an empty message "
        f"(finish_reason {reason}: {why})."
    )


def test_reads_a_gzip_compressed_answer(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    # OpenAI compresses its answers for clients that accept it, as both adapters do.
    body = json.dumps(chat_completion(text="Zipped.", model=MODEL)).encode()
    fake.script(Raw(200, gzip.compress(body), headers={"Content-Encoding": "gzip"}))

    assert make_llm().complete("Small?").text == "Zipped."


def test_needs_no_api_key_for_a_local_server(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    assert make_llm(api_key=None).complete("Hi?").text == DEFAULT_ANSWER


def test_asks_an_llm_at_an_ipv6_address(adapter: type[ChatCompletionsLLM]) -> None:
    with FakeOpenAI(host="::1") as fake:
        llm = adapter(api_key=API_KEY, base_url=fake.base_url, model=MODEL, max_attempts=1)
        try:
            assert llm.complete("Hi?").text == DEFAULT_ANSWER
        finally:
            llm.close()

    assert fake.calls == 1


def test_a_non_http_base_url_is_refused_at_once() -> None:
    # The SDK would only fail at the first ask; the lean client says so when built.
    with pytest.raises(ValueError, match="http"):
        HttpLLM(api_key="k", base_url="ftp://example.com/v1", model=MODEL)


def test_the_answer_is_parsed_alike_by_every_adapter(fake: FakeOpenAI, fake_time: FakeTime) -> None:
    body = chat_completion(text="Oui.", model="m-1")
    body["usage"] = {"prompt_tokens": 3, "completion_tokens": True}  # a bool is no count
    answers = []
    for adapter in ADAPTERS:
        fake.script(raw_json(body))
        llm = adapter(api_key=API_KEY, base_url=fake.base_url, model=MODEL)
        try:
            answers.append(llm.complete("Q?"))
        finally:
            llm.close()

    assert answers == [
        Completion(text="Oui.", model="m-1", prompt_tokens=3, finish_reason="stop")
    ] * len(ADAPTERS)


def test_refuses_to_start_without_a_key_for_the_openai_api(
    adapter: type[ChatCompletionsLLM],
) -> None:
    with pytest.raises(ValueError, match="API key"):
        adapter(api_key=None, base_url=None, model=MODEL)


def test_serves_many_threads_at_once_with_one_instance(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.latency = 0.3
    llm = make_llm(clock=time.monotonic)
    results: list[Completion] = []
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            results.append(llm.complete(f"Question {i}?"))
        except BaseException as exc:
            errors.append(exc)

    if isinstance(llm, GREEN_ADAPTERS):  # its asks run in greenlets, as in gevent workers
        gevent.joinall([gevent.spawn(ask, i) for i in range(30)])
    else:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert errors == []
    assert len(results) == 30
    assert fake.calls == 30
    # Concurrently, not one after another: the server held several at once.
    assert fake.max_in_flight > 1


# -- retries -----------------------------------------------------------------------------


def test_waits_as_retry_after_says_then_succeeds(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(Status(429, headers={"Retry-After": "2"}))

    completion = make_llm().complete("Q?")

    assert completion.text == DEFAULT_ANSWER
    assert fake.calls == 2
    assert fake_time.sleeps == [2.0]


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"retry-after-ms": "1500"}, 1.5, 1.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25, 0.25),
        ({"Retry-After": "0.75"}, 0.75, 0.75),
        # Filled in when the test runs: a date computed at collection would age.
        ({"Retry-After": "<now + 20 s as an HTTP date>"}, 10.0, 20.0),
    ],
    ids=["ms", "ms-first", "seconds", "http-date"],
)
def test_understands_every_form_of_retry_after(
    fake: FakeOpenAI,
    make_llm: MakeLLM,
    fake_time: FakeTime,
    headers: dict[str, str],
    low: float,
    high: float,
) -> None:
    if headers.get("Retry-After", "").startswith("<now"):
        headers = {"Retry-After": formatdate(time.time() + 20, usegmt=True)}
    fake.script(Status(503, headers=headers))

    make_llm().complete("Q?")

    assert len(fake_time.sleeps) == 1
    assert low <= fake_time.sleeps[0] <= high


def test_retries_5xx_with_jittered_exponential_backoff(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(Status(500), Status(503))

    completion = make_llm(backoff_base=0.5, backoff_max=8.0).complete("Q?")

    assert completion.text == DEFAULT_ANSWER
    assert fake.calls == 3
    assert len(fake_time.sleeps) == 2
    assert 0 <= fake_time.sleeps[0] <= 0.5
    assert 0 <= fake_time.sleeps[1] <= 1.0


def test_backoff_never_exceeds_its_cap(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(*[Status(503)] * 5)

    make_llm(max_attempts=6, backoff_base=10.0, backoff_max=0.25).complete("Q?")

    assert len(fake_time.sleeps) == 5
    assert all(0 <= delay <= 0.25 for delay in fake_time.sleeps)


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_retries_transient_statuses(fake: FakeOpenAI, make_llm: MakeLLM, status: int) -> None:
    fake.script(Status(status))

    assert make_llm().complete("Q?").text == DEFAULT_ANSWER
    assert fake.calls == 2


def test_gives_up_as_unavailable_when_every_attempt_fails(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(*[Status(503)] * 4)

    with pytest.raises(LLMUnavailable) as caught:
        make_llm(max_attempts=4).complete("Q?")

    assert fake.calls == 4
    assert len(fake_time.sleeps) == 3
    assert "HTTP 503 after 4 attempts" in caught.value.message
    assert "overloaded" in caught.value.message


def test_persistent_rate_limiting_is_reported_with_the_wait_asked_for(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(*[Status(429, headers={"Retry-After": "1"})] * 3)

    with pytest.raises(LLMRateLimited) as caught:
        make_llm(max_attempts=3).complete("Q?")

    assert fake.calls == 3
    assert fake_time.sleeps == [1.0, 1.0]
    assert caught.value.retry_after == 1.0
    assert "429" in caught.value.message


# -- refusals: never retried ---------------------------------------------------------------


def test_a_bad_key_is_refused_at_once_without_showing_the_key(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(
        Status(
            401,
            body={
                "error": {
                    "message": f"Incorrect API key provided: {API_KEY}. You can find your "
                    "API key at https://platform.openai.com/account/api-keys.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        )
    )

    with pytest.raises(LLMRefused) as caught:
        make_llm().complete("Q?")

    assert fake.calls == 1
    assert fake_time.sleeps == []
    message = str(caught.value)
    assert API_KEY not in message
    assert "HTTP 401" in message
    assert "Incorrect API key provided" in message
    assert API_KEY not in repr(caught.value.args)


def test_a_short_placeholder_key_is_starred_only_where_it_stands_alone(
    fake: FakeOpenAI, make_llm: MakeLLM
) -> None:
    # Local servers need no key, and people give one such as "x": the words that
    # merely contain it are kept whole, in what is stored as in what is told.
    fake.script(
        Reply(text="Paris, 8x over.", model="mixtral-8x7b-instruct"),
        Status(400, body={"error": {"message": "Context length exceeded (key x): max 4096"}}),
    )
    llm = make_llm(api_key="x", max_attempts=1)

    completion = llm.complete("Q?")
    with pytest.raises(LLMRefused) as caught:
        llm.complete("Q?")

    assert (completion.text, completion.model) == ("Paris, 8x over.", "mixtral-8x7b-instruct")
    assert "Context length exceeded (key ***): max 4096" in caught.value.message


@pytest.mark.parametrize(
    "echo", ["Authorization: Bearer%20{key}", "key={key}_x", "{key}{key}", "tok:{key}."]
)
def test_a_real_key_is_starred_wherever_a_provider_echoes_it(
    fake: FakeOpenAI, make_llm: MakeLLM, echo: str
) -> None:
    # Only a whole word was starred: next to other letters the key was stored as it was.
    key = "sk-proj-4f9a0c1e7b2d8f3a6c5e"
    fake.script(Status(400, body={"error": {"message": "Bad header " + echo.format(key=key)}}))

    with pytest.raises(LLMRefused) as caught:
        make_llm(api_key=key, max_attempts=1).complete("Q?")

    assert key not in caught.value.message
    assert "***" in caught.value.message


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_other_client_errors_are_refused_at_once(
    fake: FakeOpenAI, make_llm: MakeLLM, status: int
) -> None:
    fake.script(Status(status))

    with pytest.raises(LLMRefused, match=f"HTTP {status}"):
        make_llm().complete("Q?")

    assert fake.calls == 1


@pytest.mark.parametrize(("status", "error"), [(400, LLMRefused), (500, LLMUnavailable)])
def test_an_error_body_nested_too_deep_to_parse_is_still_the_statuss_error(
    fake: FakeOpenAI, make_llm: MakeLLM, status: int, error: type[LLMError]
) -> None:
    fake.script(Raw(status, _TOO_DEEP))

    with pytest.raises(error, match=f"HTTP {status}"):
        make_llm(max_attempts=1).complete("Q?")


def test_a_long_provider_message_is_truncated(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Status(400, body={"error": {"message": "x" * 5000, "type": "invalid"}}))

    with pytest.raises(LLMRefused) as caught:
        make_llm().complete("Q?")

    assert len(caught.value.message) < 450


@pytest.mark.parametrize(
    ("step", "error"),
    [
        (Status(400, body={"error": {"message": "bad\x00request", "type": "x"}}), LLMRefused),
        (Status(503, body={"error": {"message": "down\x00now", "type": "x"}}), LLMUnavailable),
        (
            raw_json(
                {
                    "choices": [{"message": {"content": None, "refusal": "No\x00pe"}}],
                    "model": "m",
                }
            ),
            LLMBadResponse,
        ),
    ],
    ids=["refused", "unavailable", "declined"],
)
def test_a_provider_message_is_told_without_nul(
    fake: FakeOpenAI, make_llm: MakeLLM, step: Step, error: type[LLMError]
) -> None:
    # PostgreSQL's text cannot hold NUL: the failure could not have been stored.
    fake.script(step)

    with pytest.raises(error) as caught:
        make_llm(max_attempts=1).complete("Q?")

    assert "\x00" not in caught.value.message
    assert "\ufffd" in caught.value.message


def test_a_model_name_is_told_without_nul(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Reply(text="Paris\x00.", model="gpt\x00-x"))

    completion = make_llm().complete("Q?")

    assert (completion.text, completion.model) == ("Paris\ufffd.", "gpt\ufffd-x")


def test_lone_surrogates_are_told_as_replacement_characters(
    fake: FakeOpenAI, make_llm: MakeLLM
) -> None:
    # A "\ud83d" escape in the JSON (an emoji cut at max_tokens by a provider that
    # escapes non-ASCII): neither database's driver can encode it.
    body = chat_completion(text="Paris \ud83d", model="gpt-\udc00")
    fake.script(Raw(200, json.dumps(body).encode()))

    completion = make_llm().complete("Q?")

    assert (completion.text, completion.model) == ("Paris \ufffd", "gpt-\ufffd")


# -- timeouts, dropped and refused connections -------------------------------------------


def test_a_slow_server_times_out_on_every_attempt(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Delay(2.0), Delay(2.0))

    with pytest.raises(LLMTimeout) as caught:
        make_llm(request_timeout=0.3, max_attempts=2).complete("Q?")

    assert fake.calls == 2
    assert "did not answer within 0.3 s after 2 attempts" in caught.value.message


def test_a_timeout_is_retried(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Delay(2.0))

    assert make_llm(request_timeout=0.3).complete("Q?").text == DEFAULT_ANSWER
    assert fake.calls == 2


def test_an_attempt_never_outlives_the_deadline(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Delay(30.0))
    llm = make_llm(request_timeout=20.0, deadline=0.3, clock=time.monotonic)

    started = time.monotonic()
    with pytest.raises(LLMTimeout) as caught:
        llm.complete("Q?")

    # Ended by the 0.3 s deadline, far from the 20 s request timeout or the answer.
    assert time.monotonic() - started < 10
    assert fake.calls == 1
    assert "0.3 s deadline" in caught.value.message


def test_a_last_attempt_the_deadline_cut_short_says_the_deadline_ran_out(
    fake: FakeOpenAI, make_llm: MakeLLM
) -> None:
    # Two full attempts of 0.5 s, then the 0.3 s the 1.3 s deadline had left: the
    # message named only that last 0.3 s, which was neither limit that was set.
    fake.script(Delay(30.0), Delay(30.0), Delay(30.0))
    llm = make_llm(
        request_timeout=0.5, deadline=1.3, max_attempts=3, backoff_base=0, clock=time.monotonic
    )

    with pytest.raises(LLMTimeout) as caught:
        llm.complete("Q?")

    assert fake.calls == 3
    assert caught.value.message.endswith(
        "after 3 attempts, with no time left within the 1.3 s deadline."
    )


def test_a_dropped_connection_is_retried(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Drop())

    assert make_llm().complete("Q?").text == DEFAULT_ANSWER
    assert fake.calls == 2


def test_connections_dropped_every_time_make_the_llm_unavailable(
    fake: FakeOpenAI, make_llm: MakeLLM
) -> None:
    fake.script(Drop(), Drop())

    with pytest.raises(LLMUnavailable) as caught:
        make_llm(max_attempts=2).complete("Q?")

    assert caught.value.message == (
        f"The LLM at {fake.base_url} closed the connection before it finished answering"
        " after 2 attempts."
    )
    assert fake.calls == 2


def test_a_body_not_in_its_content_encoding_says_so(fake: FakeOpenAI, make_llm: MakeLLM) -> None:
    fake.script(Raw(200, b"not gzip at all", headers={"Content-Encoding": "gzip"}))

    with pytest.raises(LLMUnavailable) as caught:
        make_llm(max_attempts=1).complete("Q?")

    assert caught.value.message == (
        f"The LLM at {fake.base_url} sent a body that is not in the Content-Encoding it names."
    )


@pytest.fixture
def broken_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server that reads each request and sends back these bytes (`param`), then
    closes the connection."""
    reply: bytes = request.param
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(reply)

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.1)

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    serve(server.accept()[0])

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
        stop.set()
        acceptor.join()


_HALF_AN_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    b'{"choices": [{"message": {"content": "Par'
)


@pytest.mark.parametrize(
    ("broken_url", "what"),
    [
        (_HALF_AN_ANSWER, "closed the connection before it finished answering"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n",
            "closed the connection before it finished answering",
        ),
        (b"", "closed the connection before it finished answering"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "answered with something that is not an HTTP response"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
            "answered with something that is not an HTTP response",
        ),
    ],
    ids=["mid-body", "mid-head", "no-answer", "not-http", "bad-chunk-size"],
    indirect=["broken_url"],
)
def test_a_connection_that_breaks_after_it_was_made_is_not_called_unreachable(
    make_llm: MakeLLM, broken_url: str, what: str
) -> None:
    with pytest.raises(LLMUnavailable) as caught:
        make_llm(base_url=broken_url, max_attempts=1).complete("Q?")

    assert caught.value.message == f"The LLM at {broken_url} {what}."


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_a_closed_port_makes_the_llm_unavailable(
    make_llm: MakeLLM, fake_time: FakeTime, closed_port_url: str
) -> None:
    with pytest.raises(LLMUnavailable) as caught:
        make_llm(base_url=closed_port_url, max_attempts=2).complete("Q?")

    assert caught.value.message == (
        f"The LLM at {closed_port_url} could not be reached after 2 attempts."
    )
    assert len(fake_time.sleeps) == 1


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose connections the kernel completes and nobody ever answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def test_a_connection_that_never_completes_says_so_not_the_request_timeout(
    make_llm: MakeLLM, silent_port: int
) -> None:
    # An https:// URL to a server that never answers the TLS handshake (a plain-HTTP
    # port, a middlebox): connecting runs out of its 0.2 s, not of the 5 s a request
    # may take, and "did not answer within 5 s" sent the reader after a slow model.
    url = f"https://127.0.0.1:{silent_port}/v1"
    llm = make_llm(base_url=url, connect_timeout=0.2, request_timeout=5.0, max_attempts=2)

    with pytest.raises(LLMTimeout) as caught:
        llm.complete("Q?")

    assert caught.value.message == (
        f"The LLM at {url} could not be connected to within 0.2 s after 2 attempts."
    )


def test_a_server_that_takes_the_request_and_stays_silent_did_not_answer(
    make_llm: MakeLLM, silent_port: int
) -> None:
    url = f"http://127.0.0.1:{silent_port}/v1"
    llm = make_llm(base_url=url, connect_timeout=0.2, request_timeout=0.5, max_attempts=1)

    with pytest.raises(LLMTimeout) as caught:
        llm.complete("Q?")

    assert caught.value.message == f"The LLM at {url} did not answer within 0.5 s."


def _completion_response(*, until_closed: bool = False) -> bytes:
    body = json.dumps(chat_completion(text="Paris.", model=MODEL)).encode()
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    # Without a length, the body runs until the server closes the connection.
    head += "Connection: close" if until_closed else f"Content-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


@pytest.fixture
def trickling_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server that answers each request with a whole, valid chat completion, a few
    bytes at a time (`param`): the headers at once then the body, all of it, or the
    headers then a body that ends with the connection."""
    what = request.param
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            response = _completion_response(until_closed=what == "until-closed")
            split = response.index(b"\r\n\r\n") + 4 if what != "response" else 0
            with contextlib.suppress(OSError):
                conn.sendall(response[:split])
                for start in range(split, len(response), 8):
                    if stop.wait(0.05):
                        return
                    conn.sendall(response[start : start + 8])

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.1)

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    threading.Thread(target=serve, args=(server.accept()[0],)).start()

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
        stop.set()
        acceptor.join()


# "until-closed": http.client lets go of the connection's socket for such a body, and
# the deadline, which looked the socket up on the connection, found none to shut.
@pytest.mark.parametrize("trickling_url", ["body", "response", "until-closed"], indirect=True)
def test_an_answer_that_trickles_in_for_longer_than_the_timeout_times_out(
    make_llm: MakeLLM, trickling_url: str
) -> None:
    # Every wait for bytes is short (0.05 s); the answer as a whole takes seconds. A
    # limit on each wait alone let it through whenever it came, however late.
    llm = make_llm(base_url=trickling_url, request_timeout=0.5, max_attempts=1)

    with pytest.raises(LLMTimeout) as caught:
        llm.complete("Q?")

    assert caught.value.message == f"The LLM at {trickling_url} did not answer within 0.5 s."


def test_an_exchange_that_ended_in_time_leaves_its_connection_to_the_next(
    fake: FakeOpenAI, make_llm: MakeLLM
) -> None:
    llm = make_llm(request_timeout=0.2)
    llm.complete("Q?")
    time.sleep(0.5)  # past the first exchange's deadline: its scope is long closed

    llm.complete("Q?")

    first, second = fake.peers
    assert second == first  # the same kept-alive connection, not shut down and redone


def test_credentials_in_the_base_url_stay_out_of_messages(
    make_llm: MakeLLM, closed_port_url: str
) -> None:
    url = closed_port_url.replace("http://", "http://user:hunter2@")

    with pytest.raises(LLMUnavailable) as caught:
        make_llm(base_url=url, max_attempts=1).complete("Q?")

    assert "hunter2" not in caught.value.message
    assert closed_port_url in caught.value.message


def test_a_key_in_the_base_urls_query_stays_out_of_messages(
    make_llm: MakeLLM, closed_port_url: str
) -> None:
    # Gateways that take the key as ?key= or ?api-key=: the message is shown on the
    # command line, stored with the failed record and served by the HTTP API.
    url = f"{closed_port_url}?api-key=hunter2#hunter2"

    with pytest.raises(LLMUnavailable) as caught:
        make_llm(base_url=url, max_attempts=1).complete("Q?")

    assert "hunter2" not in caught.value.message
    assert closed_port_url in caught.value.message


# -- the deadline ---------------------------------------------------------------------------


def test_a_retry_after_beyond_the_deadline_fails_at_once(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(Status(429, headers={"Retry-After": "60"}))

    with pytest.raises(LLMRateLimited) as caught:
        make_llm(deadline=10.0).complete("Q?")

    assert fake.calls == 1
    assert fake_time.sleeps == []
    assert caught.value.retry_after == 60.0
    assert "10 s deadline" in caught.value.message


def test_retries_stop_when_the_next_wait_would_pass_the_deadline(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime
) -> None:
    fake.script(*[Status(503, headers={"Retry-After": "4"})] * 5)

    with pytest.raises(LLMUnavailable):
        make_llm(deadline=10.0, max_attempts=5).complete("Q?")

    # Waits at 0 and 4 fit in 10 s; a third, from 8 to 12, would not.
    assert fake_time.sleeps == [4.0, 4.0]
    assert fake.calls == 3


# -- bodies that are not answers: never retried -------------------------------------------

_NULL_CONTENT = chat_completion(text=None, model=MODEL)
_TOO_DEEP = b"[" * 100_000 + b"]" * 100_000
_EMPTY_CONTENT = chat_completion(text="  ", model=MODEL)


def test_a_refusal_is_a_bad_response_in_the_models_own_words(
    fake: FakeOpenAI, make_llm: MakeLLM
) -> None:
    refusal = {"content": None, "refusal": "I can't help with that."}
    fake.script(raw_json({**_NULL_CONTENT, "choices": [{"message": refusal}]}))

    with pytest.raises(LLMBadResponse) as caught:
        make_llm().complete("Q?")

    assert caught.value.message == (
        f"The LLM at {fake.base_url} declined to answer: I can't help with that."
    )


@pytest.mark.parametrize(
    "step",
    [
        Raw(200, b"not json"),
        Raw(200, b"not json", content_type="text/plain"),
        Raw(200, b"[1, 2]"),
        Raw(200, b'{"choices": "\xff"}'),
        raw_json({"object": "chat.completion"}),
        raw_json({**_NULL_CONTENT, "choices": []}),
        raw_json({**_NULL_CONTENT, "choices": "many"}),
        raw_json({**_NULL_CONTENT, "choices": [1]}),
        raw_json(_NULL_CONTENT),
        raw_json(_EMPTY_CONTENT),
        # Deeper than Python's JSON parser recurses: RecursionError, not ValueError.
        Raw(200, _TOO_DEEP),
        Raw(200, b'{"choices": ' + _TOO_DEEP + b"}"),
    ],
    ids=[
        "not-json",
        "text-plain",
        "json-list",
        "not-utf-8",
        "no-choices-key",
        "empty-choices",
        "choices-not-a-list",
        "choice-not-an-object",
        "null-content",
        "blank-content",
        "nested-too-deep",
        "choices-nested-too-deep",
    ],
)
def test_a_malformed_answer_is_a_bad_response(
    fake: FakeOpenAI, make_llm: MakeLLM, fake_time: FakeTime, step: Raw
) -> None:
    fake.script(step)

    with pytest.raises(LLMBadResponse) as caught:
        make_llm().complete("Q?")

    assert fake.calls == 1
    assert fake_time.sleeps == []
    assert caught.value.message.startswith(f"The LLM at {fake.base_url} ")


def test_an_answer_larger_than_qna_takes_is_a_bad_response(
    fake: FakeOpenAI, make_llm: MakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 MB from a broken gateway was stored whole, and sent back with every page of
    # history holding it.
    monkeypatch.setattr(chat_completions, "MAX_REPLY_BYTES", 4096)
    body = json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": "x" * 5000}}]}
    ).encode()
    fake.script(Raw(200, body))

    with pytest.raises(LLMBadResponse) as caught:
        make_llm().complete("Q?")

    assert caught.value.message == (
        f"The LLM at {fake.base_url} answered with {len(body):,} bytes, "
        "more than qna takes from an LLM (4,096)."
    )
    assert fake.calls == 1  # not retried: it would send the same again


def test_the_default_sleep_is_time_sleep_as_it_is_when_called(
    fake: FakeOpenAI, adapter: type[ChatCompletionsLLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    # gevent workers patch time.sleep after the adapters were imported: a backoff must
    # park only its own greenlet, so the default sleep is looked up at each call.
    fake.script(Status(503, headers={"Retry-After": "0.25"}))
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    llm = adapter(api_key=API_KEY, base_url=fake.base_url, model=MODEL, max_attempts=2)
    try:
        assert llm.complete("Q?").text == DEFAULT_ANSWER
    finally:
        llm.close()

    assert slept == [0.25]


# -- proxies ------------------------------------------------------------------------------


def test_goes_through_the_proxy_named_in_http_proxy(
    fake: FakeOpenAI, make_llm: MakeLLM, proxy_env: pytest.MonkeyPatch
) -> None:
    # The fake answers proxy-style requests too; the LLM's own host does not exist, so
    # an answer means the request went to the proxy.
    proxy_env.setenv("HTTP_PROXY", fake.base_url.rsplit("/v1", 1)[0])

    llm = make_llm(base_url="http://llm.example.invalid/v1", max_attempts=1)

    assert llm.complete("Through the proxy?").text == DEFAULT_ANSWER
    assert fake.calls == 1


@pytest.mark.parametrize(
    ("broken_url", "what"),
    [
        (_HALF_AN_ANSWER, "closed the connection before it finished answering"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "answered with something that is not an HTTP response"),
    ],
    ids=["mid-body", "not-http"],
    indirect=["broken_url"],
)
def test_a_proxy_that_breaks_the_exchange_is_told_as_without_one(
    make_llm: MakeLLM, proxy_env: pytest.MonkeyPatch, broken_url: str, what: str
) -> None:
    # Behind a proxy the SDK sends through httpx's own transport, with its own errors.
    proxy_env.setenv("HTTP_PROXY", broken_url.rsplit("/v1", 1)[0])
    url = "http://llm.example.invalid/v1"

    with pytest.raises(LLMUnavailable) as caught:
        make_llm(base_url=url, max_attempts=1).complete("Q?")

    assert caught.value.message == f"The LLM at {url} {what}."


def test_no_proxy_sends_straight_to_the_server(
    fake: FakeOpenAI, make_llm: MakeLLM, proxy_env: pytest.MonkeyPatch
) -> None:
    proxy_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    proxy_env.setenv("NO_PROXY", "127.0.0.1")

    assert make_llm(max_attempts=1).complete("Straight there?").text == DEFAULT_ANSWER


# -- connections --------------------------------------------------------------------------


def _pooled_socket(llm: ChatCompletionsLLM, url: str) -> socket.socket:
    """The socket of the connection the adapter's pool keeps for `url`."""
    if isinstance(llm, GreenHttpLLM):
        assert llm._green is not None
        return llm._green._pool._socket_queue.peek(block=False)  # type: ignore[no-any-return]
    if isinstance(llm, GreenOpenAILLM):
        (server,) = llm._client._client._transport._servers.values()  # type: ignore[attr-defined]
        return server._pool._socket_queue.peek(block=False)  # type: ignore[no-any-return]
    owner = llm._client._client._transport if isinstance(llm, OpenAILLM) else llm
    pool_manager = owner._pool  # type: ignore[union-attr]
    connection = pool_manager.connection_from_url(url)._get_conn()
    assert connection.sock is not None, "the ask's connection was not kept for reuse"
    return connection.sock  # type: ignore[no-any-return]


def test_keeps_its_connection_with_tcp_keepalive_on(
    fake: FakeOpenAI, make_llm: MakeLLM, proxy_env: pytest.MonkeyPatch
) -> None:
    # So an idle pooled connection that a NAT or firewall drops silently is kept open
    # by the probes, or found dead, instead of being found dead by a read timeout.
    llm = make_llm()
    llm.complete("Kept?")

    sock = _pooled_socket(llm, fake.base_url)

    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


def test_both_clients_send_through_green_http_once_gevent_has_patched_the_process() -> None:
    # As in `qna serve`'s gevent workers; elsewhere (the CLI, the library, threads) the
    # urllib3 pool, which OS threads may share.
    script = (
        "from qna.adapters.http_llm import HttpLLM\n"
        "from qna.adapters.openai_llm import OpenAILLM\n"
        "def kinds():\n"
        "    options = dict(api_key='k', base_url='http://127.0.0.1:9/v1', model='m')\n"
        "    http, sdk = HttpLLM(**options), OpenAILLM(**options)\n"
        "    return type(http._green).__name__, type(sdk._client._client._transport).__name__\n"
        "before = kinds()\n"
        "from gevent import monkey\n"
        "monkey.patch_all()\n"
        "print(*before, *kinds())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NoneType", "Urllib3Transport", "GreenHttp", "GreenTransport"]
