"""An httpx transport that sends the SDK's requests through `green_http`, in gevent
workers: the SDK's own work is unchanged, the wire work costs what the http client's
does (see green_http for why). Elsewhere the SDK keeps `urllib3_transport`.

Like httpx's own transport, this one raises only httpx's exceptions, which the SDK
turns into APITimeoutError (timeouts) and APIConnectionError (everything else).
"""

from __future__ import annotations

import threading

import httpx2

from qna.adapters.broken_exchanges import ConnectFailed, ExchangeFailed, UnsendableRequest
from qna.adapters.green_http import MAX_IN_FLIGHT, GreenHttp


class GreenTransport(httpx2.BaseTransport):
    def __init__(self, *, max_connections: int = MAX_IN_FLIGHT) -> None:
        self._max_connections = max_connections
        # httpx's own TLS settings (its CA bundle, SSL_CERT_FILE...): the SDK trusts
        # the same servers through this transport as through its default one.
        self._ssl_context = httpx2.create_ssl_context()
        self._servers: dict[tuple[str, str, int | None], GreenHttp] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        # The SDK's whole-request timeout is the read one (it sets them all alike but
        # connect); the connection pool keeps to the connect one.
        timeouts = request.extensions.get("timeout", {})
        server = self._server(request.url, timeouts.get("connect"))
        headers = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw
        ]
        target = request.url.raw_path.decode("ascii")
        try:
            response = server.request(
                request.method, target, headers, request.read(), timeouts.get("read")
            )
        except TimeoutError as exc:
            raise httpx2.ReadTimeout(str(exc), request=request) from exc
        except UnsendableRequest as exc:
            raise httpx2.LocalProtocolError(str(exc), request=request) from exc
        except ConnectFailed as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        except ExchangeFailed as exc:
            raise httpx2.NetworkError(str(exc), request=request) from exc
        return httpx2.Response(
            response.status,
            headers=[
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in response.headers
            ],
            # Still encoded: httpx decodes, from the headers it is given. A stream, not
            # content=: the client times the response until it is read.
            stream=httpx2.ByteStream(response.body),
            request=request,
        )

    def _server(self, url: httpx2.URL, connect_timeout: float | None) -> GreenHttp:
        key = (url.scheme, url.host, url.port)
        server = self._servers.get(key)
        if server is None:
            with self._lock:
                server = self._servers.get(key)
                if server is None:
                    server = GreenHttp(
                        url.scheme,
                        url.host,
                        url.port,
                        connect_timeout=connect_timeout or 5.0,
                        pool_size=self._max_connections,
                        ssl_context=self._ssl_context,
                    )
                    self._servers[key] = server
        return server

    def close(self) -> None:
        with self._lock:
            for server in self._servers.values():
                server.close()
            self._servers.clear()
