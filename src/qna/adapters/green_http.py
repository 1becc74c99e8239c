"""HTTP requests to the LLM inside gevent workers: geventhttpclient's connection pool and
its C response parser, instead of urllib3 and http.client.

In `qna serve`'s gevent workers, urllib3 pays for threads the worker does not have (a
lock and a queue per request, a `poll()` per reuse check that goes through gevent's hub)
and http.client parses every response's headers with the email package, in Python.
With 500 asks in flight that was the largest part of an ask's CPU. geventhttpclient,
made for gevent, parses in C: about 0.6 ms less CPU per ask here (see the README,
Performance). Both LLM clients use this once gevent has patched the process (`HttpLLM`
directly, the SDK through `green_transport`); its pool and its waits are gevent's, so
OS threads must not share it, and elsewhere they keep urllib3.

Connections are what urllib3 makes elsewhere: TCP keep-alive probes, TLS with the
system's trust store and the host name checked, one kept for reuse per ask in flight
(urllib3 keeps at most 2,048; here as many as were in flight together).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from typing import Any, NamedTuple

import gevent
import gevent.ssl
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.response import (
    HTTPConnectionClosed,
    HTTPParseError,
    HTTPResponse,
    HTTPSocketPoolResponse,
)

from qna.adapters.broken_exchanges import (
    ConnectFailed,
    ExchangeFailed,
    NotHttp,
    Undecodable,
    UnsendableRequest,
)
from qna.adapters.llm_pool import SOCKET_OPTIONS
from qna.adapters.sockets import readable

# Content codings decoded as urllib3 decodes them (zlib's wbits for each).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_BODILESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
#: Requests in flight per server, at most (each on a connection of its own). The pool
#: keeps as many idle for reuse: a limit below what a worker serves at once would make
#: asks queue for a connection (urllib3 opens another instead), and idle ones number no
#: more than the asks that were once in flight together.
MAX_IN_FLIGHT = 100_000


_CLOSED_EARLY = re.compile(r"^Incomplete response|^connection closed", re.IGNORECASE)


class _OutOfTime(BaseException):
    """The exchange's own time limit. Not a TimeoutError (an OSError): geventhttpclient
    takes an OSError while connecting for one address failing and tries the server's
    next one, with no time limit left."""


class Response(NamedTuple):
    status: int
    #: As received: names in their case, repeated names repeated, values latin-1 text.
    headers: list[tuple[str, str]]
    #: As received: still in its Content-Encoding (see `decoded`).
    body: bytes


class _Pool(ConnectionPool):
    """geventhttpclient's pool, its sockets with keep-alive probes and, for https, TLS
    set up as urllib3 does it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: Any,
        size: int,
        connect_timeout: float,
    ) -> None:
        super().__init__(
            host,
            port,
            host,
            port,
            size=size,
            connection_timeout=connect_timeout,
            # No limit per read: the whole exchange is limited (GreenHttp.request).
            network_timeout=None,  # type: ignore[arg-type]
        )
        #: None for plain HTTP, else the SSLContext to wrap each connection in.
        self._tls = tls

    def after_connect(self, sock: Any) -> None:
        for option in SOCKET_OPTIONS:
            sock.setsockopt(*option)

    def _connect_socket(self, sock: Any, address: Any) -> Any:
        sock = super()._connect_socket(sock, address)
        if self._tls is None:
            return sock
        return self._tls.wrap_socket(sock, server_hostname=self._request_host)

    # geventhttpclient's own check before reuse is a zero-timeout select() through
    # gevent's hub; readable() is the same check without the hub (as llm_pool's is).
    def _is_socket_alive(self, sock: Any) -> bool:
        return sock is not None and sock.fileno() >= 0 and not readable(sock.fileno())


class _Response(HTTPSocketPoolResponse):
    def _on_message_complete(self) -> None:
        if self.get_code() < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows
            # on this socket, which must not go back to the pool before it is read.
            HTTPResponse._on_message_complete(self)
        else:
            super()._on_message_complete()


class GreenHttp:
    """Requests to one server (`scheme://host:port`) over kept connections. For https,
    `ssl_context` (a gevent one) or else the system's trust store, as urllib3's."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int | None,
        *,
        connect_timeout: float,
        pool_size: int = MAX_IN_FLIGHT,
        ssl_context: Any = None,
    ) -> None:
        tls = None
        if scheme == "https":
            tls = ssl_context if ssl_context is not None else gevent.ssl.create_default_context()
        default_port = 443 if tls is not None else 80
        port = port or default_port
        self._pool = _Pool(host, port, tls=tls, size=pool_size, connect_timeout=connect_timeout)
        bracketed = f"[{host}]" if ":" in host else host
        self._host = bracketed if port == default_port else f"{bracketed}:{port}"

    def close(self) -> None:
        self._pool.close()

    def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        timeout: float | None,
    ) -> Response:
        """One request, its answer read whole within `timeout` seconds (else
        TimeoutError; None: no limit); ExchangeFailed (ConnectFailed, NotHttp) for any
        other failure. `headers` are sent as given, with Host and Content-Length added
        when not among them."""
        lines = [f"{method} {target} HTTP/1.1"]
        names = set()
        for name, value in headers:
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise UnsendableRequest(f"The header {name!r} cannot be sent.")
            lines.append(f"{name}: {value}")
            names.add(name.lower())
        if "host" not in names:
            lines.append(f"Host: {self._host}")
        if "content-length" not in names and (body or method not in _BODILESS_METHODS):
            lines.append(f"Content-Length: {len(body)}")
        try:
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError as exc:
            raise UnsendableRequest(f"A header cannot be sent: {exc}") from exc
        try:
            with gevent.Timeout(timeout, _OutOfTime()):
                return self._exchange(method, head + body)
        except _OutOfTime:
            raise TimeoutError(f"no answer within {timeout:.3g} s") from None
        except HTTPParseError as exc:
            # geventhttpclient tells a connection closed mid-answer as a parse error
            # too: HTTPConnectionClosed before any byte, its parser's "Incomplete
            # response." or its own "connection closed ..." after some.
            if isinstance(exc, HTTPConnectionClosed) or _CLOSED_EARLY.search(str(exc)):
                raise ExchangeFailed(f"the connection closed mid-answer: {exc}") from exc
            raise NotHttp(f"not an HTTP response: {exc}") from exc
        except (TimeoutError, ExchangeFailed):  # TimeoutError: connecting took too long
            raise
        except Exception as exc:
            # Any other failure (refused, reset, TLS, a name that does not resolve, a
            # closed pool) is this request's, not a crash of the ask.
            raise ExchangeFailed(str(exc) or type(exc).__name__) from exc

    def _exchange(self, method: str, request: bytes) -> Response:
        try:
            sock = self._pool.get_socket()
        except TimeoutError:
            raise
        except Exception as exc:  # refused, no such host, TLS: nothing was sent
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        try:
            sock.sendall(request)  # head and body in one write: one packet
        except BaseException:
            self._pool.release_socket(sock)
            raise
        # Reads the head; gives the socket back to the pool once the body is read (or
        # closes it, when the server said so or reading failed).
        response = _Response(sock, self._pool, method=method)
        try:
            body = response.read()
        finally:
            response.release()
        return Response(response.status_code, list(response.info().items()), body)


def decoded(response: Response) -> bytes:
    """The body without its gzip or deflate Content-Encoding, as urllib3 gives it."""
    coding = next(
        (value for name, value in response.headers if name.lower() == "content-encoding"), ""
    )
    wbits = _DECODERS.get(coding.strip().lower())
    if wbits is None:
        return response.body
    try:
        return zlib.decompress(response.body, wbits)
    except zlib.error as exc:
        raise Undecodable(f"a body that is not {coding} as it says") from exc
