"""What the end-to-end tests share: a clean environment and a look straight into the table."""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import create_engine, text

# Settings qna reads; a developer's shell or CI must not leak them into a test.
_SETTING_PREFIXES = ("OPENAI_", "QNA_")
_KEPT = ("QNA_TEST_",)  # the test suite's own variables, not qna settings


def clear_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name == "DATABASE_URL" or (
            name.startswith(_SETTING_PREFIXES) and not name.startswith(_KEPT)
        ):
            monkeypatch.delenv(name)


def settings_free_environ() -> dict[str, str]:
    """The current environment minus every qna setting, for a subprocess."""
    return {
        name: value
        for name, value in os.environ.items()
        if name != "DATABASE_URL"
        and not (name.startswith(_SETTING_PREFIXES) and not name.startswith(_KEPT))
    }


def stored_rows(url: str) -> list[dict[str, Any]]:
    """Every row of `qn_a`, read with plain SQL rather than through qna's own code."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            result = connection.execute(
                text(
                    "SELECT id, question, status, model, error_kind, prompt_tokens,"
                    " completion_tokens, finish_reason, latency_ms FROM qn_a"
                )
            )
            rows = [dict(row._mapping) for row in result]
        # SQLite hands the id back as 32 hex digits, PostgreSQL as a UUID.
        return [{**row, "id": UUID(str(row["id"]))} for row in rows]
    finally:
        engine.dispose()


def error_line(stderr: str) -> str:
    """The single `qna: error:` line a failing command must print, and nothing else."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qna: error:"), stderr
    return lines[0]
