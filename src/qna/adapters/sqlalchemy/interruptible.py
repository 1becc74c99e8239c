"""psycopg2 waits that Ctrl-C can break off, for the command line.

psycopg2 waits for PostgreSQL inside libpq's C code, where Python runs no signal
handler: a Ctrl-C (or SIGTERM) while `qna ask` waited behind a lock took effect only
when the statement ended, up to QNA_DB_STATEMENT_TIMEOUT_S later (never, with 0). With
a wait callback, psycopg2 leaves the waiting to Python: here a `select()` that a
signal interrupts, whose handler's KeyboardInterrupt then cancels the statement on
the server and ends the command (psycopg2 closes a connection whose wait failed).

As in `green.py` (gevent's callback), libpq's `connect_timeout` does not apply to the
asynchronous connects a wait callback brings, so it is kept here: running out of it is
the OperationalError a blocking connect raises.

The callback is process-wide: the command line installs it, never `import qna`, whose
host program's own psycopg2 connections are none of qna's business.
"""

from __future__ import annotations

import contextlib
import select
import time
from typing import Any

import psycopg2
from psycopg2 import extensions


def make_psycopg_interruptible() -> None:
    """Install the wait callback, unless one is there already (gevent's)."""
    if extensions.get_wait_callback() is None:
        extensions.set_wait_callback(wait_interruptibly)


def wait_interruptibly(connection: Any) -> None:
    setting_up = connection.status == extensions.STATUS_SETUP
    timeout = connect_timeout_of(connection.dsn) if setting_up else None
    give_up_at = time.monotonic() + timeout if timeout is not None else None
    try:
        while True:
            try:
                state = connection.poll()
            except psycopg2.OperationalError as exc:
                if setting_up:
                    raise _naming_the_server(exc, connection.dsn) from exc
                raise
            if state == extensions.POLL_OK:
                return
            left = None if give_up_at is None else give_up_at - time.monotonic()
            if left is not None and left <= 0:
                connection.close()
                raise connect_timed_out(timeout)
            fd = connection.fileno()
            if state == extensions.POLL_READ:
                select.select([fd], [], [], left)
            elif state == extensions.POLL_WRITE:
                select.select([], [fd], [], left)
            else:
                raise psycopg2.OperationalError(f"unexpected state from poll(): {state}")
    except KeyboardInterrupt:  # SIGTERM's Terminated too
        if not setting_up:
            # The server stops the statement (and lets go of its locks) now, rather
            # than when it notices the connection is gone.
            with contextlib.suppress(psycopg2.Error):
                connection.cancel()
        raise


def _naming_the_server(exc: psycopg2.OperationalError, dsn: str) -> psycopg2.OperationalError:
    """A failed connect's error, naming the server as a blocking connect's does: libpq
    leaves out its 'connection to server at "host", port 5432 failed: ' when
    connecting asynchronously ("Connection refused", and no word of where)."""
    message = str(exc)
    if message.startswith(("connection to server", "could not translate host name")):
        return exc
    parameters = extensions.parse_dsn(dsn)
    host = parameters.get("host") or parameters.get("hostaddr") or "localhost"
    port = parameters.get("port") or "5432"
    if host.startswith("/"):  # a Unix socket's directory
        return psycopg2.OperationalError(
            f'connection to server on socket "{host}/.s.PGSQL.{port}" failed: {message}'
        )
    return psycopg2.OperationalError(
        f'connection to server at "{host}", port {port} failed: {message}'
    )


def connect_timed_out(timeout: float | None) -> psycopg2.OperationalError:
    """What a connect that ran out of `connect_timeout` under a wait callback raises."""
    return psycopg2.OperationalError(f"connection to the database timed out after {timeout:g} s")


def connect_timeout_of(dsn: str) -> float | None:
    """The DSN's `connect_timeout` in seconds, or None when it sets none."""
    try:
        value = float(extensions.parse_dsn(dsn).get("connect_timeout", ""))
    except (ValueError, psycopg2.ProgrammingError):
        return None
    return value if value > 0 else None
