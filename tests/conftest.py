from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import create_engine, sqlite_url
from tests.support.databases import postgres_server, scratch_database
from tests.support.fake_openai import FakeOpenAI


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """One migrated PostgreSQL database for the session; tests empty it as they start."""
    with scratch_database(postgres_server_url) as url:
        engine = create_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture
def empty_postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A brand-new database with no tables, for migration tests."""
    with scratch_database(postgres_server_url) as url:
        yield url


def _truncate(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM qn_a"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: every storage test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "qna.db")
        engine = create_engine(url)
        migrate.upgrade(engine)
    else:
        url = request.getfixturevalue("postgres_url")
        engine = create_engine(url)
        _truncate(engine)
    engine.dispose()
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def outcomes_refused(postgres_url: str) -> Iterator[str]:
    """An empty PostgreSQL database that takes questions but refuses their outcomes,
    as one whose disk filled up between the two would."""
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM qn_a"))
            connection.execute(text(_REFUSE_OUTCOMES))
            connection.execute(
                text(
                    "CREATE TRIGGER qna_test_disk_full BEFORE UPDATE ON qn_a"
                    " FOR EACH ROW EXECUTE FUNCTION qna_test_disk_full()"
                )
            )
        yield postgres_url
    finally:
        with engine.begin() as connection:  # the next test's database takes outcomes
            connection.execute(text("DROP TRIGGER IF EXISTS qna_test_disk_full ON qn_a"))
            connection.execute(text("DROP FUNCTION IF EXISTS qna_test_disk_full()"))
        engine.dispose()


_REFUSE_OUTCOMES = """
CREATE FUNCTION qna_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
END $$
"""
