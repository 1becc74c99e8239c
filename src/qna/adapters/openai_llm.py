"""The LLM port over the official `openai` SDK: chat completions from OpenAI or from any
OpenAI-compatible server (vLLM, Ollama, LM Studio...). The default adapter.

This is the only module that knows the SDK exists: its exceptions become
`chat_completions.Failure`s here, and its retries are replaced by ours, which keep to
one deadline.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import httpx2
import openai

from qna.adapters.broken_exchanges import (
    BROKEN_OFF,
    NOT_HTTP,
    UNDECODABLE,
    UNREACHABLE,
    what_failed,
)
from qna.adapters.chat_completions import ChatCompletionsLLM, Failure, Reply, error_message
from qna.adapters.llm_pool import POOL_SIZE, under_gevent
from qna.adapters.urllib3_transport import Urllib3Transport

# Servers such as Ollama or vLLM want no key, but the SDK refuses to start without one.
_PLACEHOLDER_API_KEY = "unused"
_POOL_LIMITS = httpx2.Limits(max_connections=None, max_keepalive_connections=POOL_SIZE)


class OpenAILLM(ChatCompletionsLLM):
    """Chat completions through the SDK's client, which is thread-safe and pools
    connections: one instance serves every thread of a process.

    `green`: send through `green_transport` (gevent's sockets) rather than urllib3,
    when no proxy is set; by default, when gevent has patched the process.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        green: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(api_key=api_key, base_url=base_url, **options)
        # One client for the adapter's life: it holds the HTTP connection pool, so asks
        # reuse warm connections. max_retries=0 because `complete` retries on its own,
        # within its deadline; with both, each of our attempts would hide up to
        # SDK-default retries and sleeps of its own, and the attempts would multiply.
        self._client = openai.OpenAI(
            api_key=api_key or _PLACEHOLDER_API_KEY,
            base_url=base_url,
            max_retries=0,
            timeout=openai.Timeout(self._request_timeout, connect=self._connect_timeout),
            http_client=_http_client(green if green is not None else under_gevent()),
        )
        self._set_where(str(self._client.base_url))

    def close(self) -> None:
        self._client.close()

    def _attempt(self, question: str, timeout: float, connect_timeout: float) -> Reply | Failure:
        started = time.monotonic()
        try:
            # The SDK's documented call for any endpoint, not `chat.completions.create`:
            # the same request (headers, auth, timeout, transport) and the same errors
            # for a failed request or a non-2xx status, without create()'s walk of the
            # parameters against their TypedDict annotations (half of the SDK's CPU per
            # call here, for a body of two fields). The body is left to us too: read by
            # the code the http client uses (ChatCompletionsLLM._read_reply), both
            # adapters judge a body alike, and no ChatCompletion model is built (it
            # was 15-30% of the CPU of a call).
            response = self._client.post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=self._request_body(question),
                options={"timeout": openai.Timeout(timeout, connect=connect_timeout)},
            )
        # APITimeoutError subclasses APIConnectionError, so it must come first.
        except openai.APITimeoutError as exc:
            return self._timed_out(timeout, connect_timeout, started, exc)
        except openai.APIConnectionError as exc:
            return self._exchange_failed(exc, _what_failed(exc))
        except openai.APIStatusError as exc:
            # The SDK hands over the "error" member of OpenAI-style bodies, or the text.
            message = error_message(exc.body)
            return self._status_failure(exc.status_code, exc.response.headers, message, exc)
        return self._read_reply(response.content)


def _what_failed(exc: openai.APIConnectionError) -> str:
    # httpx's own transport (used behind a proxy) says it with httpx's exceptions;
    # ours pass on what they were given, which `what_failed` reads.
    cause = exc.__cause__
    if isinstance(cause, httpx2.DecodingError):
        return UNDECODABLE
    if isinstance(cause, httpx2.RemoteProtocolError | httpx2.ReadError | httpx2.WriteError):
        known = what_failed(cause)
        if known != UNREACHABLE:
            return known  # ours: the transport over urllib3 or geventhttpclient
        # httpx's own: "Server disconnected ..." or "peer closed connection ..." when
        # the connection closed, else its parser's words for what is not HTTP
        # ("illegal status line", ...).
        if isinstance(cause, httpx2.RemoteProtocolError) and not str(cause).startswith(
            ("Server disconnected", "peer closed connection")
        ):
            return NOT_HTTP
        return BROKEN_OFF
    return what_failed(exc)


def _http_client(green: bool) -> httpx2.Client:
    # The SDK keeps 100 idle connections; with more asks than that in flight, every
    # extra ask would open and close a TCP (and TLS) connection.
    if any(scheme in ("http", "https", "all") for scheme in urllib.request.getproxies()):
        # httpx reads proxies from the environment only when it makes the transport
        # itself; so with a proxy configured, it does (its own connection pool).
        return openai.DefaultHttpxClient(limits=_POOL_LIMITS)
    if green:
        from qna.adapters.green_transport import GreenTransport

        return openai.DefaultHttpxClient(transport=GreenTransport())
    return openai.DefaultHttpxClient(transport=Urllib3Transport())
