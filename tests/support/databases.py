"""Real PostgreSQL for the tests: testcontainers when Docker answers, else QNA_TEST_DATABASE_URL.

Skipping is opt-in (QNA_ALLOW_NO_POSTGRES=1) and refused when CI is set: a suite that
silently skips its database tests passes while checking nothing.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

from qna.adapters.sqlalchemy import database, migrate
from qna.adapters.sqlalchemy.database import normalise_url


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin URL of a PostgreSQL server whose role may create databases."""
    url = os.environ.get("QNA_TEST_DATABASE_URL")
    if url:
        yield normalise_url(url)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg2") as container:
            yield container.get_connection_url()
        return
    reason = (
        "No PostgreSQL: set QNA_TEST_DATABASE_URL (scripts/test does) or start a Docker engine."
    )
    if os.environ.get("CI") or not os.environ.get("QNA_ALLOW_NO_POSTGRES"):
        pytest.fail(reason + " Set QNA_ALLOW_NO_POSTGRES=1 to skip these tests locally.")
    pytest.skip(reason)


def _drop(admin: Engine, name: str) -> None:
    """DROP DATABASE … WITH (FORCE) ends our own sessions in it, but refuses when the
    database holds a process of no role we may signal ("must be a member of the role
    whose process is being terminated"; with only this role and the superuser on the
    server, most likely an autovacuum worker). Such a process is gone within moments:
    try again for a while."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except ProgrammingError as exc:
            if "must be a member of the role" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server, dropped afterwards."""
    name = f"qna_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop(admin, name)
        admin.dispose()


BROKEN_SQLITE_FILES = ("not-a-database", "corrupt")


def broken_sqlite_file(path: Path, kind: str) -> str:
    """The URL of a SQLite file that is not a database ("not-a-database": some other
    program's bytes) or is no longer one ("corrupt": a migrated database whose pages
    after the first were overwritten, as a failing disk leaves it)."""
    noise = random.Random(kind)  # the same bytes on every run
    url = database.sqlite_url(path)
    if kind == "not-a-database":
        path.write_bytes(noise.randbytes(8192))
        return url
    engine = database.create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()  # the last connection to close folds the WAL into the file
    intact = path.read_bytes()
    page = 4096
    path.write_bytes(intact[:page] + noise.randbytes(len(intact) - page))
    return url


#: A schema revision no qna migration has: what a newer qna would leave.
NEWER_REVISION = "9999_future"


def migrate_as_a_newer_qna(url: str) -> None:
    """Migrate the database at `url`, then stamp it with NEWER_REVISION, as if a newer
    qna had migrated it (a rolled-back deploy, an older qna on a shared database)."""
    engine = database.create_engine(url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE alembic_version SET version_num = :v"), {"v": NEWER_REVISION}
            )
    finally:
        engine.dispose()


#: A password the test server refuses; distinctive, so that a test can tell it was not shown.
WRONG_PASSWORD = "wrong-pw-5b1e0c"


#: A database name the test server does not have.
MISSING_DATABASE = "qna_no_such_database"


def with_missing_database(url: str) -> str:
    """`url` (a PostgreSQL database) naming a database its server does not have."""
    return make_url(url).set(database=MISSING_DATABASE).render_as_string(hide_password=False)


def with_wrong_password(url: str) -> str:
    """`url` (a PostgreSQL database) with a password its server refuses. Fails the test
    if the server lets the wrong password in (trust authentication): it would check
    nothing."""
    wrong = make_url(url).set(password=WRONG_PASSWORD).render_as_string(hide_password=False)
    engine = create_engine(wrong)
    try:
        with engine.connect():
            pass
    except OperationalError:
        return wrong
    finally:
        engine.dispose()
    pytest.fail(f"The PostgreSQL server at {make_url(url).host} accepts any password.")
