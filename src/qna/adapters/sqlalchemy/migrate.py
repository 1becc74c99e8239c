"""Alembic, configured in code so it uses the application's own engine and URL."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from qna.adapters.sqlalchemy.database import unavailable_as_storage_error
from qna.domain.errors import StorageUnavailable

# Alembic is imported where it is used: every command brings the schema up to date
# first, and loading Alembic (with Mako and Pygments, which it imports) and its
# scripts cost ~0.2 s of each one's start, for a schema that is nearly always up to
# date already (`HEAD_REVISION`).
if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

#: The newest migration's revision, so that finding the schema at it takes one
#: query, without Alembic. A migration added without updating it is caught by a
#: test that compares it with the scripts' head.
HEAD_REVISION = "0005"

# An arbitrary constant: the key of the PostgreSQL advisory lock that serialises
# concurrent upgrades (several workers or CLI processes starting at once).
_MIGRATION_LOCK_KEY = 0x716E615F6D6967  # "qna_mig"


def migrations_dir() -> Path:
    """The migration scripts: inside the installed wheel, or at the repository top."""
    package_dir = Path(__file__).resolve().parents[2]
    shipped = package_dir / "_migrations"
    if (shipped / "env.py").is_file():
        return shipped
    return package_dir.parents[1] / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    # set_main_option interpolates '%'; a path could contain one.
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# SQLSTATEs of a PostgreSQL database that will not take qna's tables: the user may
# not create them (insufficient_privilege), the database is read-only (a standby,
# default_transaction_read_only), or no schema is on the search_path.
_SCHEMA_REFUSED = frozenset({"42501", "25006", "3F000"})


#: How long one migration attempt waits for its lock on qn_a (an ALTER TABLE, a
#: CREATE INDEX), and how many are made, a pause apart. While DDL waits for its
#: lock, every later query on the table queues behind it: a transaction left open on
#: qn_a (a pg_dump, an analyst's psql session) stopped all of qna's traffic for as
#: long as it lasted. Now each attempt gives up soon and lets the queue through.
LOCK_TIMEOUT_S = 2.0
LOCK_ATTEMPTS = 5
LOCK_RETRY_PAUSE_S = 1.0
_LOCK_NOT_AVAILABLE = "55P03"


class MigrationLockBusy(StorageUnavailable):
    """A migration gave up waiting for its lock on the table: another transaction holds
    it. Retryable: once that transaction ends, the next try gets it."""


def upgrade(engine: Engine, revision: str = "head", *, lock_attempts: int | None = None) -> None:
    """To `revision`; on PostgreSQL, trying `lock_attempts` (default LOCK_ATTEMPTS) times
    for a lock on the table, each for at most LOCK_TIMEOUT_S."""
    with unavailable_as_storage_error():
        try:
            if revision == "head" and _stored_revision(engine) == HEAD_REVISION:
                return
            _upgrade_when_locked(engine, revision, lock_attempts or LOCK_ATTEMPTS)
        except DBAPIError as exc:
            # Not a fault in qna: the same database always refuses. It was an
            # internal error carrying the SQL of the CREATE TABLE.
            if getattr(exc.orig, "pgcode", None) not in _SCHEMA_REFUSED:
                raise
            reason = str(exc.orig).strip().splitlines()[0]
            raise StorageUnavailable(f"The database refused qna's tables: {reason}") from exc


def _upgrade_when_locked(engine: Engine, revision: str, attempts: int) -> None:
    for attempt in range(1, attempts + 1):
        try:
            _upgrade(engine, revision)
            return
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) != _LOCK_NOT_AVAILABLE:
                raise
            if attempt == attempts:
                tries = (
                    f"Tried {attempts} times, {LOCK_TIMEOUT_S:g} s each"
                    if attempts > 1
                    else (f"Waited {LOCK_TIMEOUT_S:g} s")
                )
                raise MigrationLockBusy(
                    "The migration could not lock the table qn_a: another transaction "
                    f"holds it (see pg_stat_activity). {tries}, so as not to hold up "
                    "qna's queries queued behind it; it is tried again with the next "
                    "start or request."
                ) from exc
            time.sleep(LOCK_RETRY_PAUSE_S)


def _upgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with migrating(engine, lambda c: _revision(c) != head_revision()) as connection:
        current = _revision(connection)
        _refuse_an_unknown_schema(current)
        if current is None:
            _refuse_an_unversioned_table(connection)
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Back to `revision` (no command offers it: for tests, and an operator's rollback
    from Python), under the same lock and with SQLite's foreign keys kept whole."""
    from alembic import command

    with unavailable_as_storage_error(), migrating(engine) as connection:
        command.downgrade(alembic_config(connection), revision)


@contextlib.contextmanager
def migrating(
    engine: Engine, work_to_do: Callable[[Connection], bool] = lambda _: True
) -> Iterator[Connection]:
    """A transaction to migrate in, once no other process migrates (on SQLite, when
    `work_to_do`: else it only reads)."""
    with engine.connect() as connection:
        sqlite_work = False
        broken_before = 0
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    # No statement timeout here: waiting for another process's upgrade,
                    # or building an index over a large table, may rightly take minutes.
                    connection.execute(text("SET LOCAL statement_timeout = 0"))
                    # Held until this transaction ends; a second process waits, then
                    # finds the schema already at head and does nothing.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                    # After the advisory lock, which may rightly wait for another
                    # process's whole upgrade: a bound on the DDL's waits (above).
                    milliseconds = round(LOCK_TIMEOUT_S * 1000)
                    connection.execute(text(f"SET LOCAL lock_timeout = {milliseconds}"))
                elif connection.dialect.name == "sqlite" and work_to_do(connection):
                    sqlite_work = True
                    # A batch migration rebuilds a table (copy it, DROP it, rename the
                    # copy). With foreign keys on, SQLite deletes the rows of a dropped
                    # table first, and ON DELETE SET NULL cleared every cached record's
                    # source_id in the copy. Off only outside a transaction: before BEGIN.
                    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                    # The same lock for SQLite, when there is anything to do: its write
                    # lock, taken before the schema is read again. Without it, processes
                    # started together on a new file each found no schema, and all but
                    # one failed creating alembic_version (exit 6). A second process
                    # waits for the lock (the busy timeout), then finds the schema at head.
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                    # Broken already, by whoever deleted a cached answer's source with
                    # foreign keys off (the sqlite3 shell's default): not the migration's
                    # doing, and no reason to refuse the database.
                    broken_before = _broken_references(connection)
                yield connection
                if sqlite_work and _broken_references(connection) > broken_before:
                    # Rolled back: what was there stays.
                    raise RuntimeError("a migration left a reference to a record that is gone")
        finally:
            if sqlite_work:
                _foreign_keys_back_on(connection)


def _broken_references(connection: Connection) -> int:
    return len(connection.exec_driver_sql("PRAGMA foreign_key_check").all())


def _foreign_keys_back_on(connection: Connection) -> None:
    try:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    except Exception:
        # Never back in the pool without them (a cached record's source could be
        # deleted from under it); and not raised over what the migration raised.
        connection.invalidate()


def _refuse_an_unversioned_table(connection: Connection) -> None:
    # qna's table without Alembic's record of its revision: restored on its own
    # (`pg_dump -t qn_a`), or alembic_version dropped. Creating the tables failed on
    # "already exists": PostgreSQL's was an internal error carrying the whole CREATE
    # TABLE, SQLite's a database "unavailable" for a retry that could never succeed.
    if inspect(connection).has_table("qn_a"):
        raise StorageUnavailable(
            "The database has qna's table (qn_a) but no record of its schema version "
            "(the alembic_version table is missing): restore that table with it, or point "
            "DATABASE_URL at another database.",
            retryable=False,
        )


def _refuse_an_unknown_schema(current: str | None) -> None:
    # A rolled-back deploy, an older qna pointed at a shared database, or DATABASE_URL
    # pointing at another application's database (Alembic keeps its revision in the
    # same alembic_version table) finds a revision qna has no script for; alembic's
    # "Can't locate revision" would be an internal error, and "migrations pending"
    # would promise that a restart fixes it. Which of them it is cannot be told from
    # the revision, so the message names both and what mends each.
    if current is not None and current not in known_revisions():
        raise StorageUnavailable(
            f"The database holds a schema qna does not know (Alembic revision {current}): "
            "another application's, or a newer qna's. Point DATABASE_URL at qna's own "
            "database, or upgrade qna.",
            retryable=False,
        )


@functools.cache
def _scripts() -> ScriptDirectory:
    """The migrations this qna ships, read once per process."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


@functools.cache
def known_revisions() -> frozenset[str]:
    return frozenset(revision.revision for revision in _scripts().walk_revisions())


@functools.cache
def head_revision() -> str | None:
    return _scripts().get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _stored_revision(engine: Engine) -> str | None:
    """The revision the schema is at, read without Alembic; None when there is no
    schema, or when the version table holds anything but one revision (which
    Alembic then reads, to say what is wrong)."""
    with engine.connect() as connection:
        if not connection.dialect.has_table(connection, "alembic_version"):
            return None
        revisions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return revisions[0].version_num if len(revisions) == 1 else None


def is_at_head(engine: Engine) -> bool:
    """Whether the schema is at the newest migration; StorageUnavailable when the
    database cannot say, or holds a schema qna does not know (a newer qna's, another
    application's)."""
    with unavailable_as_storage_error():
        if _stored_revision(engine) == HEAD_REVISION:
            return True
        current = current_revision(engine)
    _refuse_an_unknown_schema(current)
    return current == head_revision()
