"""A small OpenAI-compatible HTTP server for tests and benchmarks.

It speaks just enough of the chat completions API for the official SDK to accept its
answers, and can be told to misbehave (error statuses, delays, dropped connections,
malformed bodies) so the adapter's retry and error mapping run over real HTTP.

It runs an aiohttp server on its own event loop in a daemon thread, so a synchronous
test can use it with ``with FakeOpenAI() as fake:``. Latency is an ``asyncio.sleep``:
hundreds of slow requests in flight cost nothing but sockets.

Standalone, for benchmarks that need it in another process::

    python tests/support/fake_openai.py --port 8001 --latency 0.5

prints its base URL on one line and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import signal
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import FrameType, TracebackType
from typing import Any, Self

from aiohttp import web

DEFAULT_ANSWER = "Paris is the capital of France."
DEFAULT_MODELS = ("gpt-4o-mini",)


@dataclass(frozen=True)
class Reply:
    """Answer normally, with any of these replaced."""

    text: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: "length": the answer cut off at the model's token limit, say.
    finish_reason: str | None = None


@dataclass(frozen=True)
class Status:
    """Answer with this status at once. Without a body, an OpenAI-style error body is made
    for the status."""

    code: int
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Delay:
    """Wait this long (instead of the usual latency), then answer normally."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Close the TCP connection without sending any response."""


@dataclass(frozen=True)
class Raw:
    """Send exactly these bytes, e.g. ``b"not json"`` or a completion without choices."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


Step = Reply | Status | Delay | Drop | Raw


def chat_completion(
    *,
    text: str | None,
    model: str,
    prompt_tokens: int = 1,
    completion_tokens: int = 1,
    id: str = "chatcmpl-fake",
    finish_reason: str = "stop",
) -> dict[str, Any]:
    """A chat.completion object as OpenAI sends it; tests use it to build odd variants
    (``text=None`` for a null content) to send with `Raw`."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# Type, code and message of the error bodies OpenAI sends for the statuses tests use.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_denied_error", None, "You are not allowed to sample from this model."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout_error", None, "Request timed out."),
    409: ("conflict_error", None, "The request conflicted with another one."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def error_body(code: int, message: str | None = None) -> dict[str, Any]:
    """An error body shaped like OpenAI's, for this status."""
    default_type = "server_error" if code >= 500 else "invalid_request_error"
    phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Error"
    kind, error_code, default_message = _ERRORS.get(code, (default_type, None, f"{phrase}."))
    return {
        "error": {
            "message": message or default_message,
            "type": kind,
            "param": None,
            "code": error_code,
        }
    }


def _words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1, on a free port unless told one.

    `latency`, `answer`, `failure_rate`, `failure_statuses` and `failure_retry_after` may be
    changed while it serves; `requests` and `calls` may be read from any thread.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        answer: str = DEFAULT_ANSWER,
        models: Sequence[str] = DEFAULT_MODELS,
        failure_rate: float = 0.0,
        failure_statuses: Sequence[int] = (429, 503),
        failure_retry_after: float | None = None,
        seed: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        #: When set, the server speaks HTTPS with it (`url` says https://).
        self.ssl_context = ssl_context
        self.latency = latency
        self.answer = answer
        self.models = tuple(models)
        #: Share of unscripted requests answered with one of `failure_statuses`, at once.
        self.failure_rate = failure_rate
        self.failure_statuses = tuple(failure_statuses)
        #: Sent as Retry-After with the random failures, when set.
        self.failure_retry_after = failure_retry_after
        # Only the server's loop draws from it, so one seed gives one sequence of failures.
        self._rng = random.Random(seed)
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._authorizations: list[str | None] = []
        self._peers: list[tuple[str, int]] = []
        self._calls = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._script: deque[Step] = deque()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- what tests read and steer ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeOpenAI is not started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"{scheme}://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return f"{self.url}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The JSON bodies of the chat completion requests received, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def authorizations(self) -> list[str | None]:
        """The Authorization header of each chat completion request, oldest first."""
        with self._lock:
            return list(self._authorizations)

    @property
    def peers(self) -> list[tuple[str, int]]:
        """The client address and port of each chat completion request, oldest first:
        which connection carried it."""
        with self._lock:
            return list(self._peers)

    @property
    def max_in_flight(self) -> int:
        """The most requests that were waiting out their latency at the same time."""
        with self._lock:
            return self._max_in_flight

    @property
    def calls(self) -> int:
        """How many chat completion requests arrived, whatever was answered."""
        with self._lock:
            return self._calls

    def script(self, *steps: Step) -> None:
        """Queue one-shot behaviours for the next chat completion requests, in order; once
        they are used up, requests are answered normally again."""
        with self._lock:
            self._script.extend(steps)

    def reset(self) -> None:
        """Forget the received requests and any unused script."""
        with self._lock:
            self._requests.clear()
            self._authorizations.clear()
            self._peers.clear()
            self._calls = 0
            self._max_in_flight = 0
            self._script.clear()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeOpenAI is already started")
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("FakeOpenAI did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError("FakeOpenAI could not start") from self._startup_error
        return self

    def stop(self) -> None:
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the thread that called start()
            self._startup_error = exc
            self._ready.set()
        finally:
            # Handlers whose client gave up (a Delay past its timeout) may still be asleep;
            # end them here, or closing the loop destroys pending tasks noisily.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._list_models)
        # No access log: a benchmark sends thousands of requests. A short shutdown timeout:
        # handlers still sleeping in a Delay are cancelled rather than awaited.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        try:
            # The default backlog of 128 would refuse connections in a benchmark that opens
            # hundreds at once.
            site = web.TCPSite(
                runner,
                self.host,
                self._requested_port,
                backlog=2048,
                ssl_context=self.ssl_context,
            )
            await site.start()
            self._port = int(runner.addresses[0][1])
            self._stopping = asyncio.Event()
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    # -- handlers -------------------------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "fake"}
                    for name in self.models
                ],
            }
        )

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        with self._lock:
            self._calls += 1
            self._authorizations.append(request.headers.get("Authorization"))
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self._peers.append((peer[0], peer[1]) if peer else ("", 0))
            if isinstance(body, dict):
                self._requests.append(body)
            step: Step | None = self._script.popleft() if self._script else None

        if step is None and self.failure_rate > 0 and self._rng.random() < self.failure_rate:
            code = self._rng.choice(self.failure_statuses)
            headers = {}
            if self.failure_retry_after is not None:
                headers["Retry-After"] = f"{self.failure_retry_after:g}"
            step = Status(code, headers=headers)

        if isinstance(step, Drop):
            return await self._drop(request)
        if isinstance(step, Status):
            return web.json_response(
                dict(step.body) if step.body is not None else error_body(step.code),
                status=step.code,
                headers=dict(step.headers or {}),
            )
        if isinstance(step, Raw):
            return web.Response(
                status=step.status,
                body=step.body,
                headers={"Content-Type": step.content_type, **step.headers},
            )

        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response(
                error_body(400, "We could not parse the JSON body of your request."), status=400
            )

        delay = step.seconds if isinstance(step, Delay) else self.latency
        if delay > 0:
            with self._lock:
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
            try:
                await asyncio.sleep(delay)
            finally:
                with self._lock:
                    self._in_flight -= 1

        reply = step if isinstance(step, Reply) else Reply()
        text = reply.text if reply.text is not None else self.answer
        question_words = sum(
            _words(m.get("content")) for m in body["messages"] if isinstance(m, dict)
        )
        return web.json_response(
            chat_completion(
                text=text,
                model=reply.model or str(body.get("model", self.models[0])),
                prompt_tokens=(
                    reply.prompt_tokens if reply.prompt_tokens is not None else question_words
                ),
                completion_tokens=(
                    reply.completion_tokens if reply.completion_tokens is not None else _words(text)
                ),
                id=f"chatcmpl-fake-{next(self._ids)}",
                finish_reason=reply.finish_reason or "stop",
            )
        )

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        # Abort rather than close: the client sees the connection die with no response at
        # all, as when a proxy or a crashed server cuts it.
        if request.transport is not None:
            request.transport.abort()
        # aiohttp needs a response object; writing it to the dead transport is a no-op.
        return web.Response(status=500)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--answer", default=DEFAULT_ANSWER)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument(
        "--failure-statuses",
        default="429,503",
        help="comma-separated statuses for random failures",
    )
    parser.add_argument("--failure-retry-after", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    fake = FakeOpenAI(
        host=args.host,
        port=args.port,
        latency=args.latency,
        answer=args.answer,
        failure_rate=args.failure_rate,
        failure_statuses=tuple(int(s) for s in args.failure_statuses.split(",") if s.strip()),
        failure_retry_after=args.failure_retry_after,
        seed=args.seed,
    )
    with fake:
        print(fake.base_url, flush=True)
        # A timed wait, so the signal handler gets to run promptly on every platform.
        while not stop.wait(timeout=0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
