from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from qna.adapters.sqlalchemy.database import create_engine
from tests.e2e.helpers import clear_settings


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the outer shell, no stray .env, no write to the real home."""
    clear_settings(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home" / ".local" / "share"))


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
