"""An httpx transport that sends the SDK's requests through urllib3's connection pool.

The openai SDK builds and reads every request itself and hands the wire work to an
httpx transport — by default httpcore's pool, which on every request walks all of
its connections and checks each idle one with a `poll()`: with hundreds of asks in
flight, and under gevent (whose `poll()` goes through its hub), that walk cost more
than the rest of the ask (see the README, Performance). urllib3 takes an idle
connection off a queue instead. Proxies are untouched: httpx routes proxied URLs
to its own proxy transports before this one is asked.
"""

from __future__ import annotations

import httpx2
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)


class Urllib3Transport(httpx2.BaseTransport):
    def __init__(self, *, max_connections: int) -> None:
        # httpx's own TLS settings (its CA bundle, SSL_CERT_FILE...): the SDK trusts
        # the same servers through this transport as through its default one.
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=max_connections,
            block=False,
            ssl_context=httpx2.create_ssl_context(),
        )

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout", {})
        try:
            response = self._pool.urlopen(
                request.method,
                str(request.url),
                body=request.read(),
                headers=dict(request.headers),
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
        except ProtocolError as exc:
            raise httpx2.RemoteProtocolError(str(exc), request=request) from exc
        except (HTTPError, OSError) as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        return httpx2.Response(
            response.status,
            headers=list(response.headers.items()),
            content=response.data,
            request=request,
        )

    def close(self) -> None:
        self._pool.clear()
