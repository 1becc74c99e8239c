"""How an exchange with the LLM failed before it gave a status, told apart for the
person reading the error: a server never reached is not one that broke off its answer.

Both HTTP clients (urllib3, and geventhttpclient in `qna serve`'s gevent workers) and
the SDK's transports over them raise their own exceptions; each wraps the one before
it, so the chain of causes says what happened at the socket.
"""

from __future__ import annotations

import http.client
import zlib
from collections.abc import Iterator

from urllib3.exceptions import DecodeError, InvalidChunkLength, NewConnectionError, ProtocolError


class ExchangeFailed(OSError):
    """The request could not be sent or its response not read (geventhttpclient)."""


class ConnectFailed(ExchangeFailed):
    """No connection could be made (refused, no such host, TLS): nothing was sent."""


class NotHttp(ExchangeFailed):
    """The server answered with something that is not an HTTP response."""


class Undecodable(ExchangeFailed):
    """A body that is not in the Content-Encoding its headers name."""


class UnsendableRequest(ValueError):
    """A header that would break the request apart (CR or LF in it); nothing was sent."""


# Each completes "The LLM at <url> ...".
UNREACHABLE = "could not be reached"
BROKEN_OFF = "closed the connection before it finished answering"
NOT_HTTP = "answered with something that is not an HTTP response"
UNDECODABLE = "sent a body that is not in the Content-Encoding it names"

_BROKEN_OFF = (
    http.client.RemoteDisconnected,
    http.client.IncompleteRead,
    ConnectionResetError,
    BrokenPipeError,
)


def what_failed(exc: BaseException) -> str:
    """What became of the exchange that raised `exc`, in the words above. A failure not
    known to have happened after connecting reads as the server not being reached."""
    connected = broken_off = False
    for link in _causes(exc):
        if isinstance(link, NewConnectionError | ConnectFailed):
            return UNREACHABLE
        if isinstance(link, DecodeError | Undecodable | zlib.error):
            return UNDECODABLE
        if isinstance(link, NotHttp | InvalidChunkLength):
            return NOT_HTTP
        if isinstance(link, ExchangeFailed):  # any other failure of geventhttpclient's
            return BROKEN_OFF
        if broken_off:
            # urllib3 tells a chunk size that is no number as an IncompleteRead too,
            # caused by int()'s ValueError.
            if type(link) is ValueError:
                return NOT_HTTP
            continue
        # Before HTTPException: RemoteDisconnected is a BadStatusLine too.
        if isinstance(link, _BROKEN_OFF):
            broken_off = True
        elif isinstance(link, http.client.HTTPException):
            return NOT_HTTP
        # Raised only once a connection was made: urllib3's "Connection aborted." and
        # "Connection broken: ...".
        connected = connected or isinstance(link, ProtocolError)
    return BROKEN_OFF if connected or broken_off else UNREACHABLE


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it, and so on (at most ten deep, each once)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 10:
        seen.add(id(link))
        yield link
        # urllib3 wraps the cause in its arguments: ProtocolError("...", cause).
        wrapped = next((arg for arg in link.args if isinstance(arg, BaseException)), None)
        context = None if link.__suppress_context__ else link.__context__
        link = link.__cause__ or wrapped or context
