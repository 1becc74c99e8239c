"""Concurrent asks share their single-row writes: many rows, one round trip.

Each ask writes twice on its own (the pending record, then its outcome), each a lone
autocommitted statement. Under load, PostgreSQL spends most of such a statement on
what every statement costs — a round trip, parsing, planning, a commit — and little
on the row: a ten-row INSERT costs the server about what two one-row INSERTs do.

A `StatementBatcher` runs one statement for whoever needs it at the moment. The
first caller finds it idle and runs it at once, with only its own row: a lone ask
waits for nobody, there is no timer. Callers that arrive while it runs queue their
rows; when it finishes, the longest-waiting of them runs the statement for all of
the queue (`executemany`: one multi-row INSERT, or the UPDATEs sent together), and
so on. Each caller returns only once its own row is committed, or raises its own
error: if a shared statement fails for a reason that may be one row's (a constraint,
a bad value), each row is run again alone, so one bad row fails only its own ask.

Works with threads and with gevent's patched ones alike (the lock and the events
are `threading`'s).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection, Executable
from sqlalchemy.exc import DBAPIError

from qna.adapters.sqlalchemy.database import is_unavailable
from qna.domain.errors import StorageUnavailable

#: Rows in one statement at most; the rest of the queue goes in the next.
MAX_BATCH = 64
#: psycopg2's execute_batch sends UPDATEs in pages of 100 (SQLAlchemy's default
#: `executemany_batch_page_size`), each page one query string and so one transaction;
#: a bigger batch would commit its first pages even if a later one failed.
_ATOMIC_UPDATE_PAGE = 100


class _Waiter:
    __slots__ = ("error", "leads", "params", "ready")

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params
        self.ready = threading.Event()
        #: Set by the caller that finished, when this one is to run the next batch.
        self.leads = False
        self.error: BaseException | None = None


class StatementBatcher:
    """Runs `statement` for concurrent callers, many parameter sets at a time."""

    def __init__(self, statement: Executable, *, max_batch: int = MAX_BATCH) -> None:
        if not 1 <= max_batch <= _ATOMIC_UPDATE_PAGE:
            raise ValueError(f"max_batch must be between 1 and {_ATOMIC_UPDATE_PAGE}")
        self._statement = statement
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._running = False

    @property
    def queued(self) -> int:
        """Rows no statement has taken yet."""
        with self._lock:
            return len(self._queue)

    def execute(
        self,
        connect: Callable[[], Connection],
        params: Mapping[str, Any],
        *,
        before_waiting: Callable[[], None] = lambda: None,
    ) -> None:
        """Run the statement with `params`, alone or with others' rows, on a connection
        in autocommit mode that `connect` gives (called only if this caller runs it).
        Returns once the row is committed; raises the error that kept it out.
        `before_waiting` runs if the caller has to wait for another's statement (to
        give back a connection it holds, say)."""
        waiter = _Waiter(params)
        with self._lock:
            self._queue.append(waiter)
            leads = not self._running
            self._running = True
        if not leads:
            try:
                before_waiting()
                waiter.ready.wait()
            except BaseException:
                self._withdraw(waiter)  # killed while queued (a gevent timeout, say)
                raise
            if not waiter.leads:
                if waiter.error is not None:
                    raise _own_copy(waiter.error)
                return
        self._run_next_batch(connect)
        if waiter.error is not None:
            raise waiter.error

    def _withdraw(self, waiter: _Waiter) -> None:
        """Take a caller that stopped waiting out of the queue, if no statement took
        its row yet (then it is never written), and pass on its turn to run one."""
        with self._lock:
            if waiter in self._queue:
                self._queue.remove(waiter)
                if waiter.leads:
                    self._hand_on()

    def _hand_on(self) -> None:
        """The next batch is the oldest queued caller's to run (under the lock)."""
        if self._queue:
            successor = self._queue[0]
            successor.leads = True
            successor.ready.set()
        else:
            self._running = False

    def _run_next_batch(self, connect: Callable[[], Connection]) -> None:
        with self._lock:
            # The runner's own row is first: it is the oldest in the queue.
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
        try:
            _run(connect, self._statement, batch)
        finally:
            with self._lock:
                self._hand_on()
            for waiter in batch[1:]:
                waiter.ready.set()


def _run(connect: Callable[[], Connection], statement: Executable, batch: list[_Waiter]) -> None:
    try:
        connection = connect()
        try:
            if len(batch) == 1:
                connection.execute(statement, batch[0].params)
            else:
                connection.execute(statement, [waiter.params for waiter in batch])
        except DBAPIError as exc:
            if len(batch) == 1 or is_unavailable(exc):
                _fail(batch, exc)  # the database's fault, not a row's: nobody is in
            else:
                _run_alone(connection, statement, batch)
        except (ValueError, TypeError):
            if len(batch) == 1:
                raise
            # Not the database's answer: the driver refused a value before sending
            # anything (psycopg2 sends no string with NUL, no lone surrogate), perhaps
            # only one row's.
            _run_alone(connection, statement, batch)
    except Exception as exc:
        _fail(batch, exc)  # no connection, or a bug: every caller is told
        raise
    except BaseException as exc:
        # The runner was killed (a gevent timeout, an interrupt): the rows may or may
        # not be in, and nobody may wait forever. The callers get an ordinary error of
        # their own, which AskQuestion retries, not another request's kill.
        interrupted = StorageUnavailable(
            "The database write was interrupted; it may or may not have been made."
        )
        interrupted.__cause__ = exc
        _fail(batch, interrupted)
        raise


def _run_alone(connection: Connection, statement: Executable, batch: list[_Waiter]) -> None:
    """Perhaps one row's fault (a constraint, a value out of range or unsendable):
    autocommit rolled the whole statement back, or it was never sent, so each row
    runs again alone, for its own outcome."""
    for index, waiter in enumerate(batch):
        try:
            connection.execute(statement, waiter.params)
        except Exception as exc:
            if isinstance(exc, DBAPIError) and is_unavailable(exc):
                _fail(batch[index:], exc)
                return
            waiter.error = exc


def _own_copy(error: BaseException) -> BaseException:
    """The error for one caller of a shared statement: a copy, so that each caller's
    traceback is its own, not one that grows with every caller that raises it."""
    try:
        own = copy.copy(error)
    except Exception:
        return error
    own.__cause__ = error.__cause__
    return own


def _fail(batch: list[_Waiter], exc: BaseException) -> None:
    for waiter in batch:
        waiter.error = exc
