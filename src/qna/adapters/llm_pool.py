"""How both LLM adapters pool their connections: urllib3 pools of one size and options,
whose exchanges are each bounded as a whole (`response_deadline`)."""

from __future__ import annotations

import socket
import sys
from typing import Any, TypeVar

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection

from qna.adapters.response_deadline import claim, release
from qna.adapters.sockets import readable


def _keepalive_options() -> list[tuple[int, int, int]]:
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    # Probe after 30 s idle, every 10 s, give up after 3: a NAT or firewall that
    # forgets idle connections keeps this one, and a peer gone silent is noticed.
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; other systems keep their defaults
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


#: urllib3's socket options (TCP_NODELAY) plus TCP keep-alive. httpcore closed
#: connections idle for 5 s; urllib3 keeps them until the server closes them, so
#: one that a middlebox dropped without a word would be found dead only by a
#: request's read timeout. Keep-alive probes keep such a path open, or find it dead.
SOCKET_OPTIONS = HTTPConnection.default_socket_options + _keepalive_options()


#: As many connections as asks in flight, all kept for reuse.
POOL_SIZE = 2048


def pool_options(maxsize: int = POOL_SIZE) -> dict[str, Any]:
    """Keyword arguments for a urllib3 PoolManager (or ProxyManager) to the LLM."""
    return {"num_pools": 4, "maxsize": maxsize, "block": False, "socket_options": SOCKET_OPTIONS}


# urllib3 checks every pooled connection before reusing it with a zero-timeout poll();
# under gevent its poll() goes through the hub, which at hundreds of asks in flight
# was ~6% of a worker's CPU. sockets.readable() is the same check without the hub.
class _CheapReuseCheck:
    sock: socket.socket | None

    @property
    def is_connected(self) -> bool:
        return self.sock is not None and not readable(self.sock.fileno())

    # Every exchange through these pools is bounded as a whole (response_deadline):
    # the connection claims the exchange's scope once the request is sent...
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        claim(self)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_CheapReuseCheck, HTTPConnection):
    pass


class _HTTPSConnection(_CheapReuseCheck, HTTPSConnection):
    pass


class _ReleasesTheScope:
    # ...and gives it up as it goes back to the pool, where another may take it.
    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            release(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _HTTPConnectionPool(_ReleasesTheScope, HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(_ReleasesTheScope, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


Manager = TypeVar("Manager", bound=PoolManager)


def with_cheap_reuse_check(manager: Manager) -> Manager:
    """`manager` (a PoolManager or ProxyManager), its pools made of the connections
    above."""
    manager.pool_classes_by_scheme = {"http": _HTTPConnectionPool, "https": _HTTPSConnectionPool}
    return manager


def under_gevent() -> bool:
    """Whether gevent has patched this process's sockets, as in `qna serve`'s workers
    (without importing gevent to find out): then the LLM clients send through
    `green_http`, whose pool is gevent's."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))
