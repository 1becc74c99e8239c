"""A deadline for a whole HTTP exchange through urllib3, which has none of its own.

urllib3's read timeout bounds each wait for bytes, not the response: a server that
sends a few bytes every second (a proxy trickling a body, a server in trouble) held an
ask for as long as it kept on, past QNA_LLM_TIMEOUT_S and QNA_LLM_DEADLINE_S, and an
endless body grew in memory all that time. (The green client, `green_http`, bounds the
whole exchange itself.)

`deadline(seconds)` opens a scope around one exchange. The pooled connection that
carries it claims the scope as it waits for the answer (`claim`, from llm_pool's
connection classes), and gives it up as it goes back to the pool (`release`). One
watchdog thread per process shuts down the socket of a scope still claimed at its
deadline, so the read in progress fails at once, and `scope.expired` tells the caller
why; a scope claimed after its deadline has passed is shut down as it is claimed.
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
    __slots__ = ("at", "done", "expired", "sock")

    def __init__(self, at: float) -> None:
        self.at = at
        #: The socket the answer comes over, while a connection has the scope claimed.
        #: Kept here, not read from the connection when the deadline comes: http.client
        #: lets go of it for a response that ends with the connection (`Connection:
        #: close`, no length), and the body is still being read from it.
        self.sock: socket.socket | None = None
        self.done = False
        #: Whether the deadline came first (then the socket was shut down).
        self.expired = False


_local = threading.local()


def claim(connection: Any) -> None:
    """Called by a connection as it waits for an answer: the open scope, if any, is its."""
    scope: Scope | None = getattr(_local, "scope", None)
    with _watchdog.lock:
        connection.qna_scope = scope
        if scope is None or scope.done:
            return
        scope.sock = connection.sock
        if scope.expired:  # its time ran out while it connected and sent
            _shut_down(scope)


def release(connection: Any) -> None:
    """Called as a connection goes back to the pool: its exchange is over, and the
    scope must not touch the connection once another exchange may take it."""
    with _watchdog.lock:
        scope: Scope | None = getattr(connection, "qna_scope", None)
        connection.qna_scope = None
        if scope is not None:
            scope.sock = None


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
        _watchdog.finish(scope)


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
        self._finished_in_heap = 0
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

    def finish(self, scope: Scope) -> None:
        with self.lock:
            scope.done = True
            scope.sock = None
            if scope.at == float("inf") or scope.expired:
                return  # never armed, or already taken off the heap by its deadline
            # Finished scopes stay in the heap until their deadline comes: with one
            # timeout for all, that is every exchange of the last timeout's length.
            # Past half the heap they are swept out, so it holds twice the exchanges
            # in flight at most, not every one of the last QNA_LLM_TIMEOUT_S seconds.
            self._finished_in_heap += 1
            if self._finished_in_heap > max(64, len(self._heap) // 2):
                self._heap = [entry for entry in self._heap if not entry[2].done]
                heapq.heapify(self._heap)
                self._finished_in_heap = 0

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, scope = heapq.heappop(self._heap)
                    if scope.done:
                        self._finished_in_heap = max(0, self._finished_in_heap - 1)
                    else:
                        scope.expired = True
                        _shut_down(scope)
                self._wake.wait(self._heap[0][0] - now if self._heap else None)


def _shut_down(scope: Scope) -> None:
    sock = scope.sock
    if sock is None:
        return  # not waiting for an answer yet (connecting has its own timeout)
    # On a duplicate of the descriptor: the TCP connection is shut down under the
    # reader, and a TLS socket's own state is not touched from this thread.
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as raw:
        raw.shutdown(socket.SHUT_RDWR)


_watchdog = _Watchdog()
