"""Migrations: from empty to head on both databases, matching the ORM, and from the wheel."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import create_engine, sqlite_url
from qna.adapters.sqlalchemy.repository import SqlAlchemyUnitOfWork
from qna.adapters.sqlalchemy.tables import metadata
from qna.domain.errors import StorageUnavailable
from qna.domain.model import QnA
from tests.integration.conftest import AppFactory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "fresh.db")
    return str(request.getfixturevalue("empty_postgres_url"))


def test_upgrade_creates_qn_a_and_matches_the_models(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        assert not migrate.is_at_head(engine)
        migrate.upgrade(engine)
        migrate.upgrade(engine)  # a second run is a no-op, not an error

        assert migrate.is_at_head(engine)
        assert "qn_a" in inspect(engine).get_table_names()
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_downgrade_to_base_and_back(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        migrate.upgrade(engine)
        migrate.downgrade(engine, "base")
        assert "qn_a" not in inspect(engine).get_table_names()
        migrate.upgrade(engine)
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize(("before", "column"), [("0002", "abandon_at"), ("0003", "finish_reason")])
def test_records_stored_before_a_new_column_keep_through_it_and_back(
    empty_url: str, before: str, column: str
) -> None:
    from alembic import command

    engine = create_engine(empty_url)
    try:
        with engine.begin() as connection:
            command.upgrade(migrate.alembic_config(connection), before)
        with engine.begin() as connection:  # as a qna of `before` stored it
            connection.execute(
                text(
                    "INSERT INTO qn_a (id, question, question_key, model, status, created_at)"
                    " VALUES ('00000000000000000000000000000001', 'q?', 'k', 'm', 'pending',"
                    " '2026-01-01 00:00:00')"
                )
            )
            # An answer from the cache, pointing at its source.
            connection.execute(
                text(
                    "INSERT INTO qn_a (id, question, question_key, model, status, created_at,"
                    " source_id) VALUES ('00000000000000000000000000000002', 'q?', 'k', 'm',"
                    " 'answered', '2026-01-01 00:00:01', '00000000000000000000000000000001')"
                )
            )
        migrate.upgrade(engine)
        with engine.connect() as connection:
            rows = connection.execute(
                text(f"SELECT question, {column}, source_id IS NULL FROM qn_a ORDER BY created_at")
            ).all()
        assert [tuple(row) for row in rows] == [("q?", None, True), ("q?", None, False)]

        # SQLite rebuilds the table to drop a column: with its foreign keys on, the
        # DROP of the old table set the copy's source_id to NULL.
        migrate.downgrade(engine, before)
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT question, source_id IS NULL FROM qn_a ORDER BY created_at")
            ).all()
        assert [tuple(row) for row in rows] == [("q?", True), ("q?", False)]
        assert column not in {c["name"] for c in inspect(engine).get_columns("qn_a")}
    finally:
        engine.dispose()


def test_a_sqlite_file_with_a_reference_broken_before_still_migrates(tmp_path: Path) -> None:
    # The sqlite3 shell keeps foreign keys off: a cached answer's source deleted there
    # leaves its source_id pointing at nothing. The check that a migration broke no
    # reference refused such a file for good, and every command with it.
    from alembic import command

    path = tmp_path / "qna.db"
    engine = create_engine(sqlite_url(path))
    try:
        with engine.begin() as connection:
            command.upgrade(migrate.alembic_config(connection), "0004")
        with sqlite3.connect(path) as shell:  # foreign keys off, as the shell's are
            shell.execute(
                "INSERT INTO qn_a (id, question, question_key, model, status, created_at,"
                " source_id) VALUES ('00000000000000000000000000000002', 'q?', 'k', 'm',"
                " 'answered', '2026-01-01 00:00:01', '00000000000000000000000000000001')"
            )
        migrate.upgrade(engine)

        assert migrate.is_at_head(engine)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM qn_a")).scalar() == 1
    finally:
        engine.dispose()


def test_a_migration_stuck_behind_a_transaction_gives_way_instead_of_waiting_forever(
    empty_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ALTER TABLE waits for every transaction that read qn_a (a pg_dump, an analyst's
    # psql session), and every later query on qn_a queued behind it: all of qna's
    # traffic stopped for as long as the other transaction lasted.
    from alembic import command

    monkeypatch.setattr(migrate, "LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(migrate, "LOCK_ATTEMPTS", 3)
    monkeypatch.setattr(migrate, "LOCK_RETRY_PAUSE_S", 0.1)
    engine = create_engine(empty_postgres_url)
    outcome: list[BaseException | None] = []

    def upgrade() -> None:
        try:
            migrate.upgrade(engine)
            outcome.append(None)
        except BaseException as exc:  # told to the test's thread
            outcome.append(exc)

    try:
        with engine.begin() as connection:
            command.upgrade(migrate.alembic_config(connection), "0003")
        with engine.connect() as reader:
            reader.execute(text("SELECT count(*) FROM qn_a"))  # holds its lock till rollback
            upgrading = threading.Thread(target=upgrade)
            upgrading.start()
            upgrading.join(timeout=30)
            reader.rollback()
        upgrading.join(timeout=30)

        [error] = outcome
        assert isinstance(error, StorageUnavailable), error
        assert "could not lock the table qn_a: another transaction holds it" in str(error)
        assert error.retryable
        assert migrate.current_revision(engine) == "0003"  # nothing half done
        migrate.upgrade(engine)  # once the other transaction is over
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()


def test_requests_to_a_server_whose_migration_waits_for_a_lock_get_503_at_once(
    empty_postgres_url: str, make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each request ran the migration's five tries (14 s) while holding the app's lock,
    # the next ones queued behind it, and each try queued the table's queries anew.
    from alembic import command

    from qna.entrypoints.http import app as http_app

    monkeypatch.setattr(migrate, "LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(http_app, "SCHEMA_RETRY_S", 0.5)
    tries: list[str] = []
    upgrade_once = migrate._upgrade

    def upgrade(engine: Engine, revision: str) -> None:
        tries.append(revision)
        upgrade_once(engine, revision)

    monkeypatch.setattr(migrate, "_upgrade", upgrade)
    engine = create_engine(empty_postgres_url)
    try:
        with engine.begin() as connection:
            command.upgrade(migrate.alembic_config(connection), "0003")
        client = make_app(empty_postgres_url).test_client()
        with engine.connect() as reader:
            reader.execute(text("SELECT count(*) FROM qn_a"))  # holds its lock till rollback
            first = client.get("/questions")
            at_once = client.get("/readyz")
            reader.rollback()

        for response in (first, at_once):
            assert response.status_code == 503
            assert response.get_json()["error"]["code"] == "database_unavailable"
        for response in (first, at_once):
            assert "could not lock the table qn_a" in response.get_json()["error"]["message"]
        assert tries == ["head"]  # one try, and none for the probe that came after it
        time.sleep(0.6)  # SCHEMA_RETRY_S, after which a request tries again
        assert client.get("/questions").status_code == 200
        assert tries == ["head", "head"]
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()


def test_installed_wheel_migrates_an_empty_database(
    tmp_path: Path, empty_postgres_url: str
) -> None:
    """The migrations ship inside the wheel: a non-editable install can migrate."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("qna-*.whl"))
    # PEP 561: without the marker, mypy skips `import qna` in a user's code entirely.
    assert "qna/py.typed" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies come from the test environment (no network needed): a plain
    # path in a .pth file adds its packages but not its .pth files, so the editable
    # install of qna there stays invisible and qna comes only from the wheel.
    (purelib / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH"}}
    for name, url in {
        "postgres": empty_postgres_url,
        "sqlite": sqlite_url(tmp_path / "w.db"),
    }.items():
        env["DATABASE_URL"] = url
        result = subprocess.run(
            [str(venv / "bin" / "qna"), "db", "upgrade"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, (name, result.stderr)
        located = subprocess.run(
            [
                str(python),
                "-c",
                "import qna.adapters.sqlalchemy.migrate as m; print(m.migrations_dir())",
            ],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert str(venv) in located, located
    engine = create_engine(empty_postgres_url)
    try:
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()


def test_a_schema_from_a_newer_qna_is_storage_unavailable_naming_it(empty_url: str) -> None:
    # A rolled-back deploy, or an older qna pointed at a shared database: alembic's
    # CommandError ("Can't locate revision") was an internal error everywhere.
    engine = create_engine(empty_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))

        with pytest.raises(StorageUnavailable, match=r"does not know.*9999_future.*newer qna"):
            migrate.upgrade(engine)
        with pytest.raises(StorageUnavailable, match=r"does not know.*9999_future.*newer qna"):
            migrate.is_at_head(engine)
    finally:
        engine.dispose()


def test_qnas_table_without_its_schema_version_is_refused_naming_what_is_missing(
    empty_url: str,
) -> None:
    # As `pg_dump -t qn_a` restores it: the table, and no alembic_version.
    engine = create_engine(empty_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE alembic_version"))

        with pytest.raises(StorageUnavailable) as caught:
            migrate.upgrade(engine)
    finally:
        engine.dispose()

    assert not caught.value.retryable
    assert "no record of its schema version" in caught.value.message
    assert "CREATE TABLE" not in caught.value.message


@pytest.mark.parametrize(
    ("change", "gone"),
    [
        ("DROP TABLE qn_a", "qn_a"),
        ("ALTER TABLE qn_a DROP COLUMN finish_reason", "finish_reason"),
    ],
    ids=["table", "column"],
)
def test_qnas_schema_gone_under_an_up_to_date_version_is_refused_saying_so(
    empty_url: str, change: str, gone: str
) -> None:
    # A partial restore, or a change made by hand: alembic_version says "up to date".
    engine = create_engine(empty_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text(change))
        asked = QnA.ask("Still there?", model="m", now=datetime.now(UTC))

        writing = SqlAlchemyUnitOfWork(engine, autocommit=True)
        with pytest.raises(StorageUnavailable) as adding, writing as uow:
            uow.qnas.add(asked)
        with pytest.raises(StorageUnavailable) as listing, SqlAlchemyUnitOfWork(engine) as uow:
            uow.qnas.list(limit=5)
    finally:
        engine.dispose()

    for caught in (adding, listing):
        assert not caught.value.retryable
        assert caught.value.message.startswith(
            "The database's schema is not the one its alembic_version table records ("
        )
        assert gone in caught.value.message
        assert caught.value.message.endswith(
            "restore qna's table qn_a as it was, or point DATABASE_URL at an empty database."
        )


def test_the_head_revision_qna_knows_is_the_newest_script() -> None:
    assert migrate.head_revision() == migrate.HEAD_REVISION


_FIND_THE_SCHEMA = """
import sys
from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import create_engine

engine = create_engine(sys.argv[1])
migrate.upgrade(engine)
print(migrate.is_at_head(engine), sorted(m for m in sys.modules if m.startswith("alembic")))
"""


def test_a_schema_at_head_is_found_so_without_loading_alembic(empty_url: str) -> None:
    # Every command brings the schema up to date first; loading Alembic for that
    # was a quarter of a second of each one's start.
    def find_the_schema() -> str:
        found = subprocess.run(
            [sys.executable, "-c", _FIND_THE_SCHEMA, empty_url],
            capture_output=True,
            text=True,
            check=True,
        )
        return found.stdout.strip()

    engine = create_engine(empty_url)
    try:
        migrate.upgrade(engine, "0001")

        assert find_the_schema().startswith("True ['alembic")  # it had one to apply
        assert migrate.current_revision(engine) == migrate.HEAD_REVISION
        assert find_the_schema() == "True []"
    finally:
        engine.dispose()


@contextmanager
def write_locked_new_sqlite_file(path: Path, *, for_seconds: float) -> Iterator[threading.Timer]:
    """A new SQLite file whose write lock another connection holds for `for_seconds`
    (the timer that then lets it go), as a process started beside this one would."""
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (value INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    committer = threading.Timer(for_seconds, writer.commit)
    committer.start()
    try:
        yield committer
    finally:
        committer.cancel()
        committer.join()
        writer.close()


def test_a_new_sqlite_file_another_connection_is_writing_to_is_switched_to_wal(
    tmp_path: Path,
) -> None:
    # Processes started together on a new file: switching it to WAL while another
    # connection held its write lock failed at once with "database is locked" (exit
    # 6) — SQLite gives that switch no busy wait — instead of waiting for the lock.
    with write_locked_new_sqlite_file(tmp_path / "new.db", for_seconds=0.3):
        engine = create_engine(sqlite_url(tmp_path / "new.db"))
        try:
            with engine.connect() as connection:
                mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
                written = connection.exec_driver_sql("SELECT value FROM other").scalars().all()
            assert mode == "wal"
            # It could switch only once the writer let go: it waited for the writer's
            # commit (its row is there), not went around it.
            assert written == [1]
        finally:
            engine.dispose()


def test_switching_a_new_sqlite_file_to_wal_waits_no_longer_than_the_connect_timeout(
    tmp_path: Path,
) -> None:
    # QNA_DB_CONNECT_TIMEOUT_S bounds connecting, the switch to WAL included.
    with write_locked_new_sqlite_file(tmp_path / "new.db", for_seconds=2) as committer:
        engine = create_engine(sqlite_url(tmp_path / "new.db"), connect_timeout=0.3)
        try:
            with pytest.raises(StorageUnavailable, match="database is locked"):
                migrate.is_at_head(engine)
            assert committer.is_alive()  # the writer still holds its lock: qna gave up first
        finally:
            engine.dispose()
