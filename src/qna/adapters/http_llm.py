"""The LLM port as one HTTP request: `POST {base_url}/chat/completions` through a pooled
urllib3 client, for OpenAI or any OpenAI-compatible server.

It sends the body `openai_llm.OpenAILLM` sends and reports failures in the same words,
with the same retries (both build on `chat_completions`), for a few times less CPU per
ask: the SDK builds, validates and wraps every request and response in several layers,
which a busy server pays for on every ask (see the README, Performance). Unlike the
SDK it follows no redirects and sends no OpenAI-Organization/OpenAI-Project headers.
Chosen with `QNA_LLM_CLIENT=http`. In gevent workers (`qna serve`) the request goes
through `green_http` instead of urllib3, for less CPU still.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from qna.adapters.broken_exchanges import (
    UNREACHABLE,
    ExchangeFailed,
    UnsendableRequest,
    what_failed,
)
from qna.adapters.chat_completions import (
    ChatCompletionsLLM,
    Failure,
    Reply,
    error_message,
)
from qna.adapters.llm_pool import pool_options, under_gevent, with_cheap_reuse_check
from qna.adapters.response_deadline import deadline

if TYPE_CHECKING:
    from qna.adapters.green_http import GreenHttp

OPENAI_BASE_URL = "https://api.openai.com/v1"


class HttpLLM(ChatCompletionsLLM):
    """Chat completions over a thread-safe urllib3 pool: one instance serves every
    thread of a process. HTTP(S)_PROXY and NO_PROXY are honoured, as the SDK does.

    `green`: send through `green_http.GreenHttp` (gevent's sockets; no proxy) rather
    than urllib3; by default, when gevent has patched the process.
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
        base = (base_url or OPENAI_BASE_URL).rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Not an http(s) URL: {self._storable(base)}")
        self._set_where(base)
        # Credentials in the URL go in the Authorization header, not the request line.
        # hostname has lost the brackets of an IPv6 address, which a netloc needs.
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = host + (f":{parts.port}" if parts.port is not None else "")
        self._url = parts._replace(netloc=netloc).geturl() + "/chat/completions"
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"qna/{_version()}",
        }
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        elif parts.username is not None:
            self._headers.update(
                urllib3.make_headers(basic_auth=f"{parts.username}:{parts.password or ''}")
            )
        proxy = _proxy_for(parts.scheme, parts.hostname)
        self._pool = with_cheap_reuse_check(
            urllib3.ProxyManager(proxy, **pool_options())
            if proxy
            else urllib3.PoolManager(**pool_options())
        )
        self._green: GreenHttp | None = None
        # green_http sends the URL as it is given: one that urllib3 would encode first
        # (an IDN host, a path with a space or an è) goes through urllib3.
        sendable = urllib3.util.parse_url(self._url).url == self._url
        if proxy is None and sendable and (green if green is not None else under_gevent()):
            from qna.adapters.green_http import GreenHttp

            self._green = GreenHttp(
                parts.scheme, parts.hostname, parts.port, connect_timeout=self._connect_timeout
            )
            target = urlsplit(self._url)
            self._target = target.path + (f"?{target.query}" if target.query else "")

    def close(self) -> None:
        self._pool.clear()
        if self._green is not None:
            self._green.close()

    def _attempt(self, question: str, timeout: float, connect_timeout: float) -> Reply | Failure:
        body = json.dumps(self._request_body(question)).encode()
        started = time.monotonic()
        if self._green is not None:
            return self._green_attempt(body, timeout, connect_timeout, started)
        # `timeout` for the whole exchange, not only for each wait for bytes.
        with deadline(timeout) as exchange:
            try:
                response = self._pool.urlopen(
                    "POST",
                    self._url,
                    body=body,
                    headers=self._headers,
                    timeout=urllib3.Timeout(connect=connect_timeout, read=timeout),
                    # Our loop retries; a redirect of a POST is answered as the refusal
                    # it is.
                    retries=False,
                    redirect=False,
                )
            # NewConnectionError (refused, unknown host) subclasses the timeout errors.
            except NewConnectionError as exc:
                return self._exchange_failed(exc, UNREACHABLE)
            except Urllib3TimeoutError as exc:
                return self._timed_out(timeout, connect_timeout, started, exc)
            except (HTTPError, OSError) as exc:
                if exchange.expired:  # its socket shut down under it
                    return self._timed_out(timeout, connect_timeout, started, exc)
                return self._exchange_failed(exc, what_failed(exc))
            except ValueError as exc:
                # http.client refuses a header it cannot send (a key with a newline,
                # say): nothing was sent, as when the server cannot be reached.
                return self._exchange_failed(exc, UNREACHABLE)
        if exchange.expired:  # a body that ends with the connection ends when cut off
            cut_off = TimeoutError("the answer took longer than the timeout")
            return self._timed_out(timeout, connect_timeout, started, cut_off)
        return self._judged(response.status, response.headers, response.data)

    def _green_attempt(
        self, body: bytes, timeout: float, connect_timeout: float, started: float
    ) -> Reply | Failure:
        from qna.adapters.green_http import decoded

        assert self._green is not None
        try:
            response = self._green.request(
                "POST", self._target, self._headers.items(), body, timeout
            )
            data = decoded(response)
        except TimeoutError as exc:
            return self._timed_out(timeout, connect_timeout, started, exc)
        except UnsendableRequest as exc:
            return self._exchange_failed(exc, UNREACHABLE)
        except ExchangeFailed as exc:
            return self._exchange_failed(exc, what_failed(exc))
        headers = {name.lower(): value for name, value in response.headers}
        return self._judged(response.status, headers, data)

    def _judged(self, status: int, headers: Mapping[str, str], data: bytes) -> Reply | Failure:
        """A response, however it was sent: the reply in a 2xx, else why it failed.
        `headers` must match names case-insensitively (or be lower-cased)."""
        if not 200 <= status < 300:
            return self._status_failure(status, headers, error_message(_decode_error(data)))
        return self._read_reply(data)


def _decode_error(data: bytes) -> object:
    """An error body as JSON when it is JSON, else as text."""
    text = data.decode("utf-8", errors="replace").strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        return text


def _proxy_for(scheme: str, host: str) -> str | None:
    proxy = urllib.request.getproxies().get(scheme)
    return proxy if proxy and not urllib.request.proxy_bypass(host) else None


def _version() -> str:
    try:
        return version("qna")
    except PackageNotFoundError:
        return "dev"
