"""Engines for PostgreSQL and the embedded SQLite default."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DatabaseError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from qna.adapters.sockets import readable
from qna.domain.errors import DatabaseLoginRefused, StorageUnavailable

# Errors that mean "the database is not there right now", as opposed to a bug.
UNAVAILABLE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
# SQLite's primary result codes for a file that is not, or is no longer, a database
# (another program's file at DATABASE_URL's path, a disk that lost pages):
# SQLITE_CORRUPT and SQLITE_NOTADB. sqlite3 raises them as a plain DatabaseError, the
# class it also uses for bugs; these are not bugs. Their extended codes
# (SQLITE_CORRUPT_INDEX, say) share the low byte.
_BROKEN_SQLITE_FILE = frozenset({11, 26})


# PostgreSQL's read_only_sql_transaction: a hot standby, or default_transaction_read_only.
# psycopg2 raises it as an InternalError, its class for faults in the server too; this
# one is a database that takes no writes, as SQLite's read-only file is.
_READ_ONLY_SQLSTATE = "25006"


# qna's table, or a column of it, is not there though alembic_version says the schema
# is up to date: a restore of part of the database, a change made by hand. PostgreSQL's
# undefined_table and undefined_column; SQLite's words for the same.
_SCHEMA_GONE_SQLSTATES = frozenset({"42P01", "42703"})
_SQLITE_SCHEMA_GONE = re.compile(r"^no such (table|column): |has no column named ")


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot do the work (down, unreachable, a broken
    file, read-only, qna's schema gone from under it), as opposed to a fault in what
    qna asked of it."""
    return (
        isinstance(exc, UNAVAILABLE_ERRORS)
        or _is_broken_sqlite_file(exc)
        or getattr(getattr(exc, "orig", None), "pgcode", None) == _READ_ONLY_SQLSTATE
        or _is_schema_gone(exc)
    )


def _is_schema_gone(exc: BaseException) -> bool:
    original = getattr(exc, "orig", None)
    if getattr(original, "pgcode", None) in _SCHEMA_GONE_SQLSTATES:
        return True
    return isinstance(original, sqlite3.OperationalError) and bool(
        _SQLITE_SCHEMA_GONE.search(str(original))
    )


def _is_broken_sqlite_file(exc: BaseException) -> bool:
    original = getattr(exc, "orig", None)
    return (
        isinstance(exc, DatabaseError)
        and isinstance(original, sqlite3.DatabaseError)
        and (getattr(original, "sqlite_errorcode", None) or 0) & 0xFF in _BROKEN_SQLITE_FILE
    )


# PostgreSQL's invalid_password and invalid_authorization_specification: the server
# refused the login (wrong password, unknown role, no pg_hba.conf entry); and
# invalid_catalog_name: DATABASE_URL names a database the server does not have.
_LOGIN_REFUSED_SQLSTATES = frozenset({"28P01", "28000", "3D000"})
_NO_SUCH_DATABASE = re.compile(r'database ".*" does not exist')
# The same refusals as libpq words them: psycopg2 gives an error met while connecting
# no SQLSTATE, only this text (in English unless the server's lc_messages says
# otherwise; a refusal worded in another language is told as the database unavailable).
# "no password supplied" is libpq's own, for a server that asks for one. Not every
# "authentication failed": with LDAP, RADIUS, PAM, GSSAPI or Ident (over TCP) the
# server asks another service (Ident: one on qna's own host), and when that one is
# down a right login fails the same way, for a while.
_NO_CONNECT_PRIVILEGE = re.compile(r'permission denied for database ".*"')
_LOGIN_REFUSED_MESSAGES = re.compile(
    r"(password|Peer) authentication failed for user"
    r"|no pg_hba\.conf entry for"
    r"|pg_hba\.conf rejects connection"
    r'|role ".*" does not exist'
    r'|role ".*" is not permitted to log in'
    r"|fe_sendauth: no password supplied"
    rf"|{_NO_SUCH_DATABASE.pattern}"
    rf"|{_NO_CONNECT_PRIVILEGE.pattern}"
)
# sslmode=prefer (libpq's default) tries again without TLS after a TLS try failed for
# any reason (LDAP down, too many connections); where pg_hba.conf takes TLS only,
# that second try is refused as unencrypted whatever the first failure was, and the
# first is the one that counts.
_REFUSED_UNENCRYPTED = re.compile(r"no pg_hba\.conf entry for .*(no encryption|SSL off)\s*$")
# PostgreSQL's DETAIL when the database went away while the connection started
# (`pg_restore --clean --create`, a dropdb and createdb): not a setting to fix.
_JUST_DROPPED = "It seems to have just been dropped or renamed."


def _login_refusal(exc: BaseException) -> str | None:
    """The line of `exc` that says the database refused qna's login (DATABASE_URL's
    user name, password or database name), which no wait mends; None if none does (a
    server that is not there, say)."""
    original = getattr(exc, "orig", None)
    pgcode = getattr(original, "pgcode", None)
    lines = str(original).strip().splitlines()
    if any(_JUST_DROPPED in line for line in lines):
        return None  # a database being restored or renamed: there again soon, perhaps
    if pgcode in _LOGIN_REFUSED_SQLSTATES:
        return lines[0] if lines else type(original).__name__
    if not isinstance(exc, OperationalError) or pgcode is not None:
        return None  # an error met in a session carries its code
    # libpq reports each address (or sslmode=prefer's TLS try, then the plain one) on
    # a line of its own: the refusal may be any of them, and is the one to report.
    lines = [
        line
        for index, line in enumerate(lines)
        if not (_REFUSED_UNENCRYPTED.search(line) and _tried_before(line, lines[:index]))
    ]
    return next((line for line in lines if _LOGIN_REFUSED_MESSAGES.search(line)), None)


def _tried_before(line: str, earlier: list[str]) -> bool:
    """Whether one of the `earlier` lines is a failed try at `line`'s address (libpq:
    'connection to server at "db" (10.0.0.5), port 5432 failed: ...')."""
    address, failed, _ = line.partition(" failed: ")
    return bool(failed) and any(other.startswith(address + failed) for other in earlier)


def storage_unavailable(exc: BaseException) -> StorageUnavailable:
    """The domain error for a driver failure, with the driver's first line as the reason
    (a refused login: the line that says so)."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    reason = lines[0] if lines else type(original).__name__
    refusal = _login_refusal(exc)
    if refusal is not None:
        # libpq's words name the user, never the password.
        if getattr(original, "pgcode", None) == "3D000" or _NO_SUCH_DATABASE.search(refusal):
            check = "its database name"
        elif _NO_CONNECT_PRIVILEGE.search(refusal):
            check = "that its user may connect to that database"
        else:
            check = "its user name and password"
        return DatabaseLoginRefused(
            f"The database refused the login of DATABASE_URL (check {check}): {refusal.strip()}"
        )
    if _is_schema_gone(exc):
        # No wait mends it, and `qna db upgrade` does not either: the schema's recorded
        # version is already the newest.
        return StorageUnavailable(
            "The database's schema is not the one its alembic_version table records "
            f"({reason}): restore qna's table qn_a as it was, or point DATABASE_URL at "
            "an empty database.",
            retryable=False,
        )
    # A broken file stays broken however long the caller waits.
    return StorageUnavailable(
        f"The database is unavailable: {reason}", retryable=not _is_broken_sqlite_file(exc)
    )


@contextmanager
def unavailable_as_storage_error() -> Iterator[None]:
    """Inside: a database that cannot do the work raises StorageUnavailable; any
    other SQLAlchemy error (a fault in what was asked) passes through as it is."""
    try:
        yield
    except SQLAlchemyError as exc:
        if is_unavailable(exc):
            raise storage_unavailable(exc) from exc
        raise


def normalise_url(url: str) -> str:
    """Accept the URLs people actually write and pin PostgreSQL to psycopg2.

    `postgres://` (Heroku, many PaaS) is not a SQLAlchemy dialect name, and since
    SQLAlchemy 2.1 a bare `postgresql://` means psycopg 3, which we do not ship.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


class UnknownConnectionOption(ValueError):
    """DATABASE_URL's query names a connection option libpq does not know."""


def _check_connection_options(engine: Engine) -> None:
    # libpq refuses an unknown option (a misspelt ?sslmode=) only when connecting,
    # as a ProgrammingError, which is a fault in qna's own work anywhere else.
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import make_dsn

    _args, params = engine.dialect.create_connect_args(engine.url)
    try:
        make_dsn(**params)
    except ProgrammingError as exc:
        raise UnknownConnectionOption(str(exc).strip().removeprefix("invalid dsn: ")) from None


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


# A query waiting on a server that vanished without closing the connection (host
# down, network partition) fails in about a minute instead of hanging: libpq's TCP
# keep-alive probes after 30 s of silence (the kernel's default waits two hours), and
# a request the server never acknowledges is dropped after 60 s (TCP_USER_TIMEOUT;
# retransmissions would otherwise go on for some fifteen minutes).
_TCP_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    connect_timeout: float = 5.0,
    statement_timeout: float | None = None,
) -> Engine:
    """`statement_timeout` (seconds, PostgreSQL only): the server cancels any statement
    that runs longer — one stuck behind a lock, say — and the caller gets
    StorageUnavailable instead of a request that never ends; None or 0: no limit.
    Migrations are exempt."""
    url = normalise_url(url)
    backend = make_url(url).get_backend_name()
    options: dict[str, Any] = {}
    if backend == "sqlite":
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"timeout": connect_timeout, "check_same_thread": False}
    else:
        options.update(
            pool_size=pool_size,
            # No overflow: under load, overflow connections were opened and closed
            # again by the hundred per second (a PostgreSQL backend forked for each).
            # A statement holds a connection for well under a millisecond, so asks
            # queue for one of a steady `pool_size` instead.
            max_overflow=0,
            # A request waits at most this long for a connection before it is told
            # the database is unavailable, instead of hanging.
            pool_timeout=connect_timeout,
            # No pre-ping (a SELECT 1 round trip per checkout, two per ask): see
            # _drop_if_closed_by_server, which costs no round trip.
            pool_pre_ping=False,
            pool_recycle=1800,
            # Several asks' outcome UPDATEs (batching.py) in one round trip, as
            # psycopg2's execute_batch sends them; several INSERTs are one multi-row
            # INSERT in any mode.
            executemany_mode="values_plus_batch",
            connect_args={"connect_timeout": max(1, round(connect_timeout)), **_TCP_KEEPALIVE},
        )
    engine = sa_create_engine(url, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_configurer(connect_timeout))
    else:
        _check_connection_options(engine)
        event.listen(engine, "checkout", _drop_if_closed_by_server)
        if statement_timeout:
            event.listen(engine, "connect", _statement_timeout_setter(statement_timeout))
    return engine


def _statement_timeout_setter(seconds: float) -> Callable[[Any, Any], None]:
    milliseconds = max(1, round(seconds * 1000))

    def set_statement_timeout(dbapi_connection: Any, _record: Any) -> None:
        # A SET once per new connection, not libpq's `options` startup parameter:
        # PgBouncer refuses startup parameters it does not know.
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET statement_timeout = {milliseconds}")
        cursor.close()
        dbapi_connection.commit()  # psycopg2 opened a transaction for the SET

    return set_statement_timeout


def _drop_if_closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Replace a pooled connection the server has closed, before any work uses it.

    A PostgreSQL restart (or pg_terminate_backend, or an idle timeout) kills every
    pooled connection, and the server says so on each socket before closing it. An
    idle connection has nothing to read, so a readable socket means a dead one.
    Raising DisconnectionError from a checkout listener makes SQLAlchemy's pool
    discard the connection and check out another: the first ask after a restart
    succeeds, at no round trip per checkout (pre-ping costs one).
    """
    if readable(dbapi_connection.fileno()):
        raise DisconnectionError("the server closed this connection")


def set_driver_autocommit(connection: Connection, on: bool) -> None:
    """Switch the driver's own autocommit mode on this checked-out connection.

    Not `execution_options(isolation_level="AUTOCOMMIT")`: when the connection goes
    back to the pool, SQLAlchemy then resets psycopg2's isolation level, and psycopg2
    does that with a `SET default_transaction_isolation` round trip — as costly as the
    BEGIN and COMMIT that autocommit saves. psycopg2's `autocommit` flag and sqlite3's
    `isolation_level` are client-side settings: switching them sends nothing.
    """
    driver = connection.connection.driver_connection
    if isinstance(driver, sqlite3.Connection):
        # DEFERRED is what sqlite3's default ("") means: a plain BEGIN.
        driver.isolation_level = None if on else "DEFERRED"
    elif driver is not None:
        driver.autocommit = on


def _sqlite_configurer(connect_timeout: float) -> Callable[[Any, Any], None]:
    def configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets `qna history` read while `qna serve` writes. Switching to it is part
        # of connecting, limited by the connect timeout (sqlite3's `timeout`, the busy
        # timeout until the next line); then concurrent writers queue for up to 5 s
        # instead of failing with "database is locked".
        _switch_to_wal(cursor, connect_timeout)
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return configure_sqlite


def _switch_to_wal(cursor: Any, timeout: float) -> None:
    # A new file starts in rollback-journal mode, and switching it to WAL (once: the
    # mode is kept in the file) reads it, then takes its write lock. When another
    # connection holds or waits for that lock meanwhile — processes started together
    # on a new file — SQLite does not wait (the busy timeout), it fails at once
    # with "database is locked", since waiting while holding the read could
    # deadlock. The statement has then done nothing and holds nothing, so it is
    # tried again until `timeout` is spent.
    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            # The primary code: SQLITE_BUSY_RECOVERY and the like are busy too.
            busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() > deadline:
                raise
        time.sleep(0.005)
