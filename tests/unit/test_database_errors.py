"""Which driver failures are the database refusing qna's login (a wrong setting), and
which are a server that is not there (worth waiting for). Against real PostgreSQL:
tests/e2e/test_cli.py and tests/integration/http/test_api.py (a wrong password)."""

from __future__ import annotations

import errno
import os
import pickle
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.exc import DatabaseError, InternalError, OperationalError

from qna.adapters.sqlalchemy.database import is_unavailable, sqlite_url, storage_unavailable
from qna.container import engine_resource
from qna.domain.errors import ConfigurationError, DatabaseLoginRefused, StorageUnavailable

PREFIX = 'connection to server at "db.example.com" (10.0.0.5), port 5432 failed: '


class DriverError(Exception):
    """A driver error with a SQLSTATE (psycopg2's cannot be given one)."""

    def __init__(self, message: str, pgcode: str | None) -> None:
        super().__init__(message)
        self.pgcode = pgcode


def connect_error(message: str) -> OperationalError:
    """What SQLAlchemy raises when psycopg2 cannot connect: no SQLSTATE, libpq's text."""
    return OperationalError("connect", None, psycopg2.OperationalError(message))


@pytest.mark.parametrize(
    "message",
    [
        'FATAL:  password authentication failed for user "qna"',
        'FATAL:  Peer authentication failed for user "qna"',
        'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "qna", database "qna", SSL off',
        'FATAL:  pg_hba.conf rejects connection for host "10.0.0.9", user "qna", database "qna"',
        'FATAL:  role "qna" does not exist',
        'FATAL:  role "qna" is not permitted to log in',
        "fe_sendauth: no password supplied",
        'FATAL:  database "qan" does not exist',
        'FATAL:  permission denied for database "qna"\n'
        "DETAIL:  User does not have CONNECT privilege.",
    ],
)
def test_a_refused_login_is_a_configuration_error_naming_database_url(message: str) -> None:
    error = storage_unavailable(connect_error(PREFIX + message + "\n"))

    assert isinstance(error, DatabaseLoginRefused)
    assert isinstance(error, ConfigurationError)
    assert isinstance(error, StorageUnavailable)
    assert not error.retryable
    assert error.code == "misconfigured"
    assert "DATABASE_URL" in error.message
    assert message.splitlines()[0].split("  ")[-1] in error.message


@pytest.mark.parametrize("sqlstate", ["28P01", "28000", "3D000"])
def test_a_refused_login_is_known_by_its_sqlstate_too(sqlstate: str) -> None:
    error = storage_unavailable(OperationalError("connect", None, DriverError("no", sqlstate)))

    assert isinstance(error, DatabaseLoginRefused)
    # In the server's language, which may not be English: the code says what to check.
    hint = "database name" if sqlstate == "3D000" else "user name and password"
    assert f"check its {hint}" in error.message


@pytest.mark.parametrize(
    "failure",
    [
        connect_error(PREFIX + "Connection refused\n\tIs the server running on that host?"),
        connect_error(PREFIX + "FATAL:  the database system is starting up"),
        connect_error(PREFIX + 'FATAL:  too many connections for role "qna"'),
        connect_error(PREFIX + "timeout expired"),
        # Checked by another service (LDAP, RADIUS, PAM): down, a right password fails.
        connect_error(PREFIX + 'FATAL:  LDAP authentication failed for user "qna"'),
        connect_error(PREFIX + 'FATAL:  RADIUS authentication failed for user "qna"'),
        connect_error(PREFIX + 'FATAL:  PAM authentication failed for user "qna"'),
        # Ident over TCP asks an identd on qna's own host: down, a right login fails.
        connect_error(PREFIX + 'FATAL:  Ident authentication failed for user "qna"'),
        # sslmode=prefer: the TLS try failed (LDAP down, too many connections), so
        # libpq tried without TLS, which a TLS-only pg_hba.conf refuses whatever the
        # first failure was.
        *(
            connect_error(
                f"{PREFIX}FATAL:  {first}\n"
                f'{PREFIX}FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "qna", '
                'database "qna", no encryption\n'
            )
            for first in (
                'LDAP authentication failed for user "qna"',
                'too many connections for role "qna"',
                'database "qna" is not currently accepting connections',
            )
        ),
        # Dropped while the connection started: restored or renamed, there again soon.
        connect_error(
            PREFIX + 'FATAL:  database "qna" does not exist\n'
            "DETAIL:  It seems to have just been dropped or renamed."
        ),
        # A session's error carries its SQLSTATE: this one is not about the login.
        OperationalError("SET ROLE", None, DriverError('role "qna" does not exist', "42704")),
        InternalError("INSERT", None, DriverError("cannot execute INSERT", "25006")),
    ],
    ids=[
        "refused",
        "starting-up",
        "too-many",
        "timeout",
        "ldap",
        "radius",
        "pam",
        "ident",
        "ldap-then-unencrypted",
        "too-many-then-unencrypted",
        "not-accepting-then-unencrypted",
        "just-dropped",
        "set-role",
        "read-only",
    ],
)
def test_a_server_that_is_not_there_stays_worth_waiting_for(failure: Exception) -> None:
    error = storage_unavailable(failure)

    assert type(error) is StorageUnavailable
    assert error.retryable


def test_a_database_the_server_does_not_have_points_at_the_database_name() -> None:
    # It was "the database is unavailable" (exit 6), worth waiting for: no wait
    # creates the database a typo in DATABASE_URL names.
    error = storage_unavailable(connect_error(PREFIX + 'FATAL:  database "qan" does not exist'))

    assert isinstance(error, DatabaseLoginRefused)
    assert "check its database name" in error.message
    assert "password" not in error.message


def test_a_refused_login_is_reported_by_the_line_that_says_so() -> None:
    # Two addresses (a host name that resolves to two): the first is down, the second
    # refuses the password.
    down = 'connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused'
    refused = (
        'connection to server at "db" (10.0.0.6), port 5432 failed: '
        'FATAL:  password authentication failed for user "qna"'
    )
    error = storage_unavailable(connect_error(f"{down}\n{refused}\n"))

    assert isinstance(error, DatabaseLoginRefused)
    assert error.message.endswith(refused)
    assert "Connection refused" not in error.message


def test_a_tls_try_that_broke_is_what_counts_not_the_unencrypted_retry() -> None:
    # sslmode=prefer: the TLS try broke off, so libpq tried without TLS, which a
    # TLS-only pg_hba.conf refuses; that refusal says nothing of why TLS failed.
    refused = 'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "qna", SSL off'
    error = storage_unavailable(
        connect_error(f"{PREFIX}SSL SYSCALL error: EOF detected\n{PREFIX}{refused}\n")
    )

    assert type(error) is StorageUnavailable
    assert error.retryable
    assert "SSL SYSCALL error" in error.message


def test_a_refused_password_stays_refused_when_the_unencrypted_retry_is_refused_too() -> None:
    password = 'FATAL:  password authentication failed for user "qna"'
    unencrypted = 'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "qna", no encryption'

    error = storage_unavailable(connect_error(f"{PREFIX}{password}\n{PREFIX}{unencrypted}\n"))

    assert isinstance(error, DatabaseLoginRefused)
    assert error.message.endswith(PREFIX + password)


def test_a_database_the_user_may_not_connect_to_points_at_its_privilege() -> None:
    error = storage_unavailable(
        connect_error(PREFIX + 'FATAL:  permission denied for database "qna"')
    )

    assert isinstance(error, DatabaseLoginRefused)
    assert "check that its user may connect to that database" in error.message
    assert "password" not in error.message


@pytest.mark.parametrize(
    ("code", "name"),
    [(11, "SQLITE_CORRUPT"), (779, "SQLITE_CORRUPT_INDEX"), (26, "SQLITE_NOTADB")],
)
def test_a_broken_sqlite_file_is_unavailable_for_good_by_any_of_its_codes(
    code: int, name: str
) -> None:
    # sqlite3 gives the extended code: SQLite 3.44 reports a damaged index so.
    original = sqlite3.DatabaseError("database disk image is malformed")
    original.sqlite_errorcode, original.sqlite_errorname = code, name
    failure = DatabaseError("UPDATE qn_a", None, original)

    assert is_unavailable(failure)
    error = storage_unavailable(failure)
    assert type(error) is StorageUnavailable
    assert not error.retryable


def test_a_refused_login_pickles_as_itself() -> None:
    # As every error qna raises: one met in a ProcessPoolExecutor worker arrives whole.
    error = storage_unavailable(connect_error(PREFIX + 'FATAL:  role "qna" does not exist'))

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is DatabaseLoginRefused
    assert (copy.message, copy.retryable) == (error.message, False)


@pytest.mark.parametrize(
    ("errno_", "retryable"),
    [
        (errno.ENOTDIR, False),  # a file where a directory should be
        (errno.EACCES, False),
        (errno.EROFS, False),
        (errno.ENOSPC, True),  # a full disk may be cleared
        (errno.EIO, True),
    ],
    ids=["not-a-directory", "no-permission", "read-only", "disk-full", "io-error"],
)
def test_a_sqlite_directory_that_cannot_be_made_is_waited_for_only_when_it_may_pass(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, errno_: int, retryable: bool
) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno_, os.strerror(errno_), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    resource = engine_resource(
        sqlite_url(tmp_path / "sub" / "qna.db"),
        pool_size=1,
        connect_timeout=1,
        statement_timeout=0,
    )

    with pytest.raises(StorageUnavailable) as caught:
        next(resource)

    assert caught.value.retryable is retryable
    assert caught.value.message.startswith(
        f"The database is unavailable: cannot create the directory {tmp_path / 'sub'}: "
    )


@pytest.fixture
def interruptible() -> Iterator[None]:
    """The command line's psycopg2 wait callback, for this test only (it is global)."""
    from psycopg2 import extensions

    from qna.adapters.sqlalchemy.interruptible import make_psycopg_interruptible

    assert extensions.get_wait_callback() is None
    make_psycopg_interruptible()
    try:
        yield
    finally:
        extensions.set_wait_callback(None)


@pytest.mark.parametrize(
    "dsn",
    ["host=127.0.0.1 port=1 dbname=x user=u", f"host={Path('/nonexistent-dir')} dbname=x user=u"],
    ids=["tcp", "unix-socket"],
)
def test_a_failed_connect_names_the_server_as_a_blocking_one_does(
    interruptible: None, dsn: str
) -> None:
    # libpq leaves "connection to server at ..." out when it connects asynchronously.
    from psycopg2 import extensions

    callback = extensions.get_wait_callback()
    extensions.set_wait_callback(None)
    with pytest.raises(psycopg2.OperationalError) as blocking:
        psycopg2.connect(dsn)
    extensions.set_wait_callback(callback)

    with pytest.raises(psycopg2.OperationalError) as waited:
        psycopg2.connect(dsn)

    assert str(waited.value) == str(blocking.value)


def test_a_connect_that_gets_no_answer_times_out_with_the_wait_callback_too(
    interruptible: None,
) -> None:
    # A server that takes the TCP connection and never answers: libpq's
    # connect_timeout applies to blocking connects only.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with pytest.raises(psycopg2.OperationalError, match="timed out after 1 s"):
            psycopg2.connect(host="127.0.0.1", port=port, dbname="x", user="u", connect_timeout=1)
