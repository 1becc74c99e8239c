"""A fast OpenAI-compatible server for bench.py: chat completions after a set latency.

    python bench/fake_llm.py --latency 0.2

It shares the machine with the servers being measured, so it must cost next to
nothing per call: one asyncio protocol, no framework (the tests' scriptable
`tests/support/fake_openai.py` costs several times more CPU per call under load).
It speaks just enough HTTP/1.1 for the SDK, urllib3 and wrk: keep-alive, bodies with
Content-Length. `POST /v1/chat/completions` answers after the latency; `GET /calls`
answers ``{"calls": N}`` at once. It prints one JSON line, ``{"base_url": ...,
"calls_url": ...}``, and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time

ANSWER = "Paris is the capital of France."
_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = 65536


class Counter:
    calls = 0


def completion(model: str, number: int) -> bytes:
    body = {
        "id": f"chatcmpl-bench-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13},
    }
    return json.dumps(body).encode()


def response(status: str, body: bytes, *, close: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode() + body


class FakeLLMProtocol(asyncio.Protocol):
    def __init__(self, latency: float, counter: Counter, ids: itertools.count[int]) -> None:
        self._latency = latency
        self._counter = counter
        self._ids = ids
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(_HEAD_END)
            if end < 0:
                if len(self._buffer) > _MAX_HEAD:
                    self._reply("431 Request Header Fields Too Large", b"{}", close=True)
                return
            lines = self._buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            self._handle(method, path, body, close=headers.get("connection") == "close")

    def _handle(self, method: str, path: str, body: bytes, *, close: bool) -> None:
        if method == "POST" and path.endswith("/chat/completions"):
            self._counter.calls += 1
            try:
                model = str(json.loads(body).get("model") or "gpt-4o-mini")
            except (ValueError, AttributeError):
                self._reply("400 Bad Request", b'{"error": {"message": "bad JSON"}}', close)
                return
            payload = completion(model, next(self._ids))
            if self._latency > 0:
                self._loop.call_later(self._latency, self._reply, "200 OK", payload, close)
            else:
                self._reply("200 OK", payload, close)
        elif method == "GET" and path == "/calls":
            self._reply("200 OK", json.dumps({"calls": self._counter.calls}).encode(), close)
        else:
            self._reply("404 Not Found", b'{"error": {"message": "not found"}}', close)

    def _reply(self, status: str, body: bytes, close: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(response(status, body, close=close))
        if close:
            self._transport.close()


async def serve(latency: float) -> None:
    loop = asyncio.get_running_loop()
    counter, ids = Counter(), itertools.count(1)
    server = await loop.create_server(
        lambda: FakeLLMProtocol(latency, counter, ids), "127.0.0.1", 0, backlog=4096
    )
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    print(json.dumps({"base_url": f"{url}/v1", "calls_url": f"{url}/calls"}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()
    asyncio.run(serve(args.latency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
