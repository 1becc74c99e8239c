"""StatementBatcher with a stand-in connection: who runs what, and who hears which error.

The same class against SQLite and PostgreSQL: tests/integration/test_repository.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError, OperationalError

from qna.adapters.sqlalchemy.batching import StatementBatcher
from qna.domain.errors import StorageUnavailable

STATEMENT = text("INSERT ...")
Params = Mapping[str, Any]


class Killed(BaseException):
    """Like gevent.Timeout or GreenletExit: not an Exception."""


class FakeConnection:
    """Records each execute; holds the first one until `release()`; fails as told."""

    def __init__(self) -> None:
        self.calls: list[Params | list[Params]] = []
        self.connects = 0
        #: The rows whose callers had to wait for another's statement.
        self.waited: list[int] = []
        self._started = threading.Event()
        self._released = threading.Event()
        self._released.set()
        #: Raised for any call whose rows include one with "bad" set.
        self.row_error: BaseException | None = None
        #: Raised for the next call with more than one row.
        self.batch_error: BaseException | None = None
        #: Raised for the next one-row call after a call with more than one row.
        self.retry_error: BaseException | None = None
        #: Raised by every connect after the first.
        self.reconnect_error: BaseException | None = None

    def connect(self) -> Connection:
        self.connects += 1
        if self.connects > 1 and self.reconnect_error is not None:
            raise self.reconnect_error
        return self  # type: ignore[return-value]

    def hold_first(self) -> None:
        self._released.clear()

    def wait_started(self) -> None:
        assert self._started.wait(5)

    def release(self) -> None:
        self._released.set()

    def execute(self, _statement: Any, params: Params | list[Params]) -> None:
        self.calls.append(params)
        self._started.set()
        assert self._released.wait(5)
        rows = params if isinstance(params, list) else [params]
        if len(rows) > 1 and self.batch_error is not None:
            error, self.batch_error = self.batch_error, None
            raise error
        if len(rows) == 1 and len(self.calls) > 1 and self.retry_error is not None:
            error, self.retry_error = self.retry_error, None
            raise error
        if self.row_error is not None and any(row.get("bad") for row in rows):
            raise self.row_error


def integrity_error() -> IntegrityError:
    return IntegrityError("INSERT ...", {}, Exception("duplicate key value"))


def operational_error() -> OperationalError:
    return OperationalError("INSERT ...", {}, Exception("server closed the connection"))


class Caller(threading.Thread):
    def __init__(self, run: Callable[[], None]) -> None:
        super().__init__()
        self._run = run
        self.error: BaseException | None = None
        self.returned = False

    def run(self) -> None:
        try:
            self._run()
            self.returned = True
        except BaseException as exc:
            self.error = exc


def ask(batcher: StatementBatcher, connection: FakeConnection, **params: Any) -> Caller:
    def before_waiting() -> None:
        connection.waited.append(params["n"])

    caller = Caller(
        lambda: batcher.execute(connection.connect, params, before_waiting=before_waiting)
    )
    caller.start()
    return caller


def wait_queued(batcher: StatementBatcher, count: int) -> None:
    deadline = time.monotonic() + 5
    while batcher.queued < count:
        assert time.monotonic() < deadline, f"{batcher.queued} of {count} rows queued"
        time.sleep(0.001)


def run_batch_behind_a_first_call(
    batcher: StatementBatcher, connection: FakeConnection, rows: list[dict[str, Any]]
) -> tuple[Caller, list[Caller]]:
    """A first call holds the statement; `rows` queue behind it; then all finish."""
    connection.hold_first()
    first = ask(batcher, connection, n=0)
    connection.wait_started()
    callers = [ask(batcher, connection, **row) for row in rows]
    wait_queued(batcher, len(rows))
    connection.release()
    for caller in [first, *callers]:
        caller.join(5)
        assert not caller.is_alive()
    return first, callers


def test_a_lone_caller_runs_its_row_at_once_on_its_own_connection() -> None:
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    ask(batcher, connection, n=1).join(5)
    assert connection.calls == [{"n": 1}]
    assert connection.waited == []
    assert connection.connects == 1
    assert batcher.queued == 0


def test_rows_that_queue_while_a_statement_runs_go_together_in_the_next() -> None:
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    first, callers = run_batch_behind_a_first_call(
        batcher, connection, [{"n": n} for n in range(1, 6)]
    )
    assert connection.calls[0] == {"n": 0}
    assert len(connection.calls) == 2
    second = connection.calls[1]
    assert isinstance(second, list)
    assert sorted(row["n"] for row in second) == [1, 2, 3, 4, 5]
    # One connection per statement: the callers whose rows another ran needed none,
    # and each was told it would wait (to give back a connection it held).
    assert connection.connects == 2
    assert sorted(connection.waited) == [1, 2, 3, 4, 5]
    assert all(caller.returned for caller in [first, *callers])


def test_a_batch_is_at_most_max_batch_rows_and_every_row_runs_once() -> None:
    batcher, connection = StatementBatcher(STATEMENT, max_batch=2), FakeConnection()
    run_batch_behind_a_first_call(batcher, connection, [{"n": n} for n in range(1, 6)])
    sizes = [len(call) if isinstance(call, list) else 1 for call in connection.calls]
    assert sizes == [1, 2, 2, 1]
    rows = [connection.calls[0]] + [
        row for call in connection.calls[1:] for row in (call if isinstance(call, list) else [call])
    ]
    assert sorted(row["n"] for row in rows) == [0, 1, 2, 3, 4, 5]


def test_a_bad_row_fails_only_its_own_caller() -> None:
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    connection.row_error = integrity_error()
    _first, callers = run_batch_behind_a_first_call(
        batcher, connection, [{"n": 1}, {"n": 2, "bad": True}, {"n": 3}]
    )
    bad = [caller for caller in callers if caller.error is not None]
    assert len(bad) == 1 and isinstance(bad[0].error, IntegrityError)
    assert sum(caller.returned for caller in callers) == 2
    # The shared statement, then each of its rows alone.
    assert isinstance(connection.calls[1], list)
    assert sorted(call["n"] for call in connection.calls[2:]) == [1, 2, 3]  # type: ignore[call-overload]


def test_a_database_failure_fails_the_whole_batch_without_retrying_row_by_row() -> None:
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    connection.batch_error = operational_error()
    _first, callers = run_batch_behind_a_first_call(
        batcher, connection, [{"n": 1}, {"n": 2}, {"n": 3}]
    )
    assert all(isinstance(caller.error, OperationalError) for caller in callers)
    assert len(connection.calls) == 2
    # The batcher is not stuck: the next caller runs.
    batcher.execute(connection.connect, {"n": 4})
    assert connection.calls[-1] == {"n": 4}


def test_a_runner_killed_mid_statement_releases_everyone_it_was_running_for() -> None:
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    connection.batch_error = Killed()
    first, callers = run_batch_behind_a_first_call(batcher, connection, [{"n": 1}, {"n": 2}])
    assert first.returned
    # The runner is killed with its own exception; the others get an ordinary error
    # (which AskQuestion retries), not another request's kill.
    killed = [caller for caller in callers if isinstance(caller.error, Killed)]
    told = [caller for caller in callers if isinstance(caller.error, StorageUnavailable)]
    assert len(killed) == 1 and len(told) == 1
    assert isinstance(told[0].error.__cause__, Killed)  # type: ignore[union-attr]
    batcher.execute(connection.connect, {"n": 3})
    assert connection.calls[-1] == {"n": 3}


def test_each_caller_of_a_failed_batch_gets_its_own_error_object() -> None:
    # One shared object would collect every caller's frames in its traceback.
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    connection.batch_error = operational_error()
    _first, callers = run_batch_behind_a_first_call(batcher, connection, [{"n": 1}, {"n": 2}])
    errors = [caller.error for caller in callers]
    assert all(isinstance(error, OperationalError) for error in errors)
    assert errors[0] is not errors[1]
    assert str(errors[0]) == str(errors[1])


def test_a_batch_never_outgrows_one_atomic_page_of_updates() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        StatementBatcher(STATEMENT, max_batch=101)


# A caller that stops waiting (a gevent timeout, gevent.kill) must not stall the queue:
# under gevent for real, in a child process (monkey-patching is for the whole process).
GEVENT_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import json, gevent
from sqlalchemy import text
from qna.adapters.sqlalchemy.batching import StatementBatcher
from qna.domain.errors import StorageUnavailable

def scenario(how):
    batcher, calls, results = StatementBatcher(text("INSERT ...")), [], {}
    greenlets = {}

    class Connection:
        def execute(self, _statement, params):
            calls.append(params)
            gevent.sleep(0.1)  # a statement in flight: the green driver parks here
            if how == "killed-when-its-turn-came" and params == {"n": "L"}:
                greenlets["F1"].kill(block=False)

    def call(name, timeout=None):
        try:
            with gevent.Timeout(timeout):
                batcher.execute(Connection, {"n": name})
            results[name] = "ok"
        except BaseException as exc:
            results[name] = type(exc).__name__

    greenlets["L"] = gevent.spawn(call, "L")
    gevent.sleep(0.01)
    greenlets["F1"] = gevent.spawn(call, "F1", 0.05 if how == "timed-out" else None)
    gevent.sleep(0.01)
    greenlets["F2"] = gevent.spawn(call, "F2")
    gevent.joinall(list(greenlets.values()), timeout=3)
    gevent.spawn(call, "Later").join(3)
    rows = sorted(p["n"] for c in calls for p in (c if isinstance(c, list) else [c]))
    return {"results": results, "rows": rows, "queued": batcher.queued}

print(json.dumps({how: scenario(how) for how in ("timed-out", "killed-when-its-turn-came")}))
"""


def test_a_caller_that_stops_waiting_is_withdrawn_and_the_queue_goes_on() -> None:
    done = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    for how in ("timed-out", "killed-when-its-turn-came"):
        result = outcome[how]
        assert result["results"]["L"] == "ok"
        assert result["results"]["F1"] in ("Timeout", "GreenletExit")
        # F1's row was never written; everyone else's was, once, and nobody hangs.
        assert result["results"]["F2"] == "ok" and result["results"]["Later"] == "ok"
        assert result["rows"] == ["F2", "L", "Later"]
        assert result["queued"] == 0


def test_no_connection_fails_a_lone_caller_and_the_next_one_runs() -> None:
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()

    def no_connection() -> Connection:
        raise operational_error()

    with pytest.raises(OperationalError):
        batcher.execute(no_connection, {"n": 1})
    assert connection.calls == []
    batcher.execute(connection.connect, {"n": 2})
    assert connection.calls == [{"n": 2}]


def test_no_connection_for_a_shared_statement_fails_every_caller_of_it() -> None:
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    connection.reconnect_error = operational_error()
    first, callers = run_batch_behind_a_first_call(
        batcher, connection, [{"n": 1}, {"n": 2}, {"n": 3}]
    )
    assert first.returned
    # None of the three rows was sent: none of their callers may return.
    assert connection.calls == [{"n": 0}]
    assert all(isinstance(caller.error, OperationalError) for caller in callers)
    assert not any(caller.returned for caller in callers)


def test_the_database_going_down_while_rows_are_retried_alone_fails_the_rest() -> None:
    # The shared statement failed for what may be one row's fault, so each row runs
    # again alone; the first of those finds the database gone: that row and every
    # later one are out, and their callers must hear it.
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    connection.batch_error = integrity_error()
    connection.retry_error = operational_error()
    _first, callers = run_batch_behind_a_first_call(
        batcher, connection, [{"n": 1}, {"n": 2}, {"n": 3}]
    )
    assert len(connection.calls) == 3  # the first, the shared one, one row alone
    assert all(isinstance(caller.error, OperationalError) for caller in callers)
    assert not any(caller.returned for caller in callers)


def test_a_caller_that_fails_before_waiting_is_withdrawn_and_the_queue_goes_on() -> None:
    # Giving back its connection can fail: that caller's ask fails, its row is never
    # run, and the others are not held up.
    batcher, connection = StatementBatcher(STATEMENT), FakeConnection()
    connection.hold_first()
    first = ask(batcher, connection, n=0)
    connection.wait_started()

    def cannot_give_back() -> None:
        raise RuntimeError("rollback failed")

    with pytest.raises(RuntimeError):
        batcher.execute(connection.connect, {"n": 1}, before_waiting=cannot_give_back)
    second = ask(batcher, connection, n=2)
    wait_queued(batcher, 1)
    connection.release()
    for caller in (first, second):
        caller.join(5)
        assert caller.returned
    assert connection.calls == [{"n": 0}, {"n": 2}]  # n=1 never ran
    assert batcher.queued == 0
