"""psycopg2 under gevent: psycogreen's wait callback, keeping to the connect timeout.

With a wait callback, psycopg2 connects asynchronously, and libpq's `connect_timeout`
only applies to blocking connects: a server that accepts the TCP connection but never
answers (overloaded, stopped with SIGSTOP, a black-holing proxy) would hold the ask
forever instead of failing as "database unavailable" after QNA_DB_CONNECT_TIMEOUT_S.
So while a connection is being set up, each wait is limited to the DSN's
`connect_timeout`, and running out of it is the same OperationalError a blocking
connect raises. Queries keep psycogreen's behaviour (no limit), as blocking ones do.
"""

from __future__ import annotations

from typing import Any

from psycogreen.gevent import gevent_wait_callback
from psycopg2 import extensions

from qna.adapters.sqlalchemy.interruptible import connect_timed_out, connect_timeout_of


def make_psycopg_cooperative() -> None:
    """Install the wait callback (once gevent has monkey-patched the process)."""
    extensions.set_wait_callback(wait_cooperatively)


def wait_cooperatively(connection: Any) -> None:
    if connection.status != extensions.STATUS_SETUP:
        gevent_wait_callback(connection)
        return
    timeout = connect_timeout_of(connection.dsn)
    try:
        gevent_wait_callback(connection, timeout=timeout)
    except TimeoutError as exc:  # gevent's socket.timeout
        connection.close()
        raise connect_timed_out(timeout) from exc
