"""An httpx transport that sends the SDK's requests through urllib3's connection pool.

The openai SDK builds and reads every request itself and hands the wire work to an
httpx transport — by default httpcore's pool, which on every request walks all of
its connections and checks each idle one with a `poll()`: with hundreds of asks in
flight, and under gevent (whose `poll()` goes through its hub), that walk cost more
than the rest of the ask (see the README, Performance). urllib3 takes an idle
connection off a queue instead.

httpx reads proxy settings from the environment only for transports it makes
itself, so `openai_llm` uses this one only when no proxy is configured.

Like httpx's own transport, this one raises only httpx's exceptions, which the SDK
turns into APITimeoutError (timeouts) and APIConnectionError (everything else).
"""

from __future__ import annotations

from typing import Any

import httpx2
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from qna.adapters.llm_pool import POOL_SIZE, pool_options, with_cheap_reuse_check
from qna.adapters.response_deadline import Scope, deadline


class Urllib3Transport(httpx2.BaseTransport):
    def __init__(self, *, max_connections: int = POOL_SIZE) -> None:
        # httpx's own TLS settings (its CA bundle, SSL_CERT_FILE...): the SDK trusts
        # the same servers through this transport as through its default one.
        self._pool = with_cheap_reuse_check(
            urllib3.PoolManager(
                **pool_options(max_connections), ssl_context=httpx2.create_ssl_context()
            )
        )

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout", {})
        body = request.read()
        # The read timeout bounds the whole exchange too, not only each wait for bytes.
        with deadline(timeouts.get("read")) as exchange:
            return self._exchange(request, body, timeouts, exchange)

    def _exchange(
        self, request: httpx2.Request, body: bytes, timeouts: dict[str, Any], exchange: Scope
    ) -> httpx2.Response:
        try:
            response = self._pool.urlopen(
                request.method,
                str(request.url),
                # None, not b"": urllib3 would add "Content-Length: 0" to a GET.
                body=body or None,
                headers=dict(request.headers),
                # urllib3 sends the request under the connect timeout and reads the
                # answer under the read timeout; it has no separate write timeout.
                timeout=urllib3.Timeout(connect=timeouts.get("connect"), read=timeouts.get("read")),
                retries=False,  # the SDK's caller retries
                redirect=False,  # httpx follows redirects, when told to, above us
                preload_content=True,
                decode_content=False,  # httpx decodes, from the headers it is given
            )
        # NewConnectionError (refused, unknown host) subclasses ConnectTimeoutError.
        except NewConnectionError as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        except ConnectTimeoutError as exc:
            raise httpx2.ConnectTimeout(str(exc), request=request) from exc
        except ReadTimeoutError as exc:
            raise httpx2.ReadTimeout(str(exc), request=request) from exc
        except (HTTPError, OSError) as exc:
            if exchange.expired:  # its socket shut down under it
                raise httpx2.ReadTimeout(str(exc), request=request) from exc
            raise self._failed(exc, request) from exc
        except ValueError as exc:
            # http.client refuses a header it cannot send (say, a key with a newline).
            raise httpx2.LocalProtocolError(str(exc), request=request) from exc
        if exchange.expired:  # a body that ends with the connection ends when cut off
            raise httpx2.ReadTimeout("the answer took longer than the timeout", request=request)
        return httpx2.Response(
            response.status,
            # As bytes: http.client decoded them as latin-1, and any byte may come.
            headers=[
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in response.headers.iteritems()
            ],
            # A stream, not content=: the client times the response until it is read.
            stream=httpx2.ByteStream(response.data),
            request=request,
        )

    @staticmethod
    def _failed(exc: HTTPError | OSError, request: httpx2.Request) -> httpx2.TransportError:
        """httpx's exception for a failed exchange, as its own transport raises them."""
        if isinstance(exc, ProtocolError):
            # A send that timed out arrives as "Connection aborted." with the timeout.
            if any(isinstance(arg, TimeoutError) for arg in exc.args):
                return httpx2.WriteTimeout(str(exc), request=request)
            return httpx2.RemoteProtocolError(str(exc), request=request)
        return httpx2.ConnectError(str(exc), request=request)

    def close(self) -> None:
        self._pool.clear()
