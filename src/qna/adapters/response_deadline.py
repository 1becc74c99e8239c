"""A deadline for a whole HTTP exchange through urllib3, which has none of its own.

urllib3's read timeout bounds each wait for bytes, not the response: a server that
sends a few bytes every second (a proxy trickling a body, a server in trouble) held an
ask for as long as it kept on, past QNA_LLM_TIMEOUT_S and QNA_LLM_DEADLINE_S, and an
endless body grew in memory all that time. (The green client, `green_http`, bounds the
whole exchange itself.)

`deadline(seconds)` opens a scope around one exchange. The pooled connection that
carries it claims the scope as it sends (`claim`, from llm_pool's connection classes);
if the scope is still open at its deadline, one watchdog thread per process shuts that
connection's socket down, so the read in progress fails at once, and `scope.expired`
tells the caller why. A connection that has since gone back to the pool and carries
another exchange is left alone.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


class Scope:
    __slots__ = ("at", "connection", "done", "expired")

    def __init__(self, at: float) -> None:
        self.at = at
        #: The urllib3 connection carrying the exchange, once it has claimed the scope.
        self.connection: Any = None
        self.done = False
        #: Whether the deadline came first (then the socket was shut down).
        self.expired = False


_local = threading.local()


def claim(connection: Any) -> None:
    """Called by a connection as it sends a request: the open scope, if any, is its."""
    scope: Scope | None = getattr(_local, "scope", None)
    with _watchdog.lock:
        connection.qna_scope = scope
        if scope is not None:
            scope.connection = connection


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[Scope]:
    """A scope for one exchange that may take `seconds` in all (None: no deadline)."""
    scope = Scope(time.monotonic() + seconds if seconds is not None else float("inf"))
    if seconds is not None:
        _watchdog.arm(scope)
    previous = getattr(_local, "scope", None)
    _local.scope = scope
    try:
        yield scope
    finally:
        _local.scope = previous
        with _watchdog.lock:
            scope.done = True


class _Watchdog:
    def __init__(self) -> None:
        self._reset()
        # A child forked while the thread held the lock would wait for it for ever;
        # the thread itself is not forked.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, Scope]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, scope: Scope) -> None:
        with self.lock:
            heapq.heappush(self._heap, (scope.at, next(self._order), scope))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="qna-response-deadline", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is scope:
                self._wake.notify()  # sooner than what the thread is waiting for

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, scope = heapq.heappop(self._heap)
                    if not scope.done:
                        scope.expired = True
                        _shut_down(scope)
                self._wake.wait(self._heap[0][0] - now if self._heap else None)


def _shut_down(scope: Scope) -> None:
    connection = scope.connection
    if connection is None or getattr(connection, "qna_scope", None) is not scope:
        return  # not sent yet (connecting has its own timeout), or carrying another
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    # On a duplicate of the descriptor: the TCP connection is shut down under the
    # reader, and a TLS socket's own state is not touched from this thread.
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as raw:
        raw.shutdown(socket.SHUT_RDWR)


_watchdog = _Watchdog()
