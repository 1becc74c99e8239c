"""The answer cache and the concurrency model, asserted on behaviour and counts.

Speed itself is measured by the benchmark (bench/run), never here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
import requests
from flask import Flask
from sqlalchemy import Engine, create_engine, insert, select, text, update

from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import sqlite_url
from qna.adapters.sqlalchemy.repository import (
    add_or_answer_from_cache_statement,
    list_statement,
)
from qna.adapters.sqlalchemy.tables import qn_a, row_values
from qna.application.ports import PageKey
from qna.domain.errors import LLMTimeout
from qna.domain.model import Abandonment, QnA
from qna.domain.model import Status as RecordStatus
from tests.integration.conftest import AppFactory
from tests.support.databases import scratch_database
from tests.support.fake_openai import FakeOpenAI, Status
from tests.support.serving import serve_env, serving

QUESTION = "What is the capital of France?"


def ask(app: Flask, question: str, **body: object) -> dict[str, object]:
    response = app.test_client().post("/ask", json={"question": question, **body})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()  # type: ignore[no-any-return]


def age_every_record(database_url: str, by: timedelta) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            rows = connection.execute(select(qn_a.c.id, qn_a.c.created_at)).all()
            for row in rows:
                connection.execute(
                    update(qn_a).where(qn_a.c.id == row.id).values(created_at=row.created_at - by)
                )
    finally:
        engine.dispose()


# -- the answer cache -----------------------------------------------------------------------------


def test_cache_is_off_by_default(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    app = make_app(database_url)

    ask(app, QUESTION)
    second = ask(app, QUESTION)

    assert fake_openai.calls == 2
    assert second["source_id"] is None


def test_a_cache_hit_is_a_new_record_pointing_at_its_source_without_an_llm_call(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    app = make_app(database_url, cache_ttl_s=3600)
    first = ask(app, QUESTION)

    hit = ask(app, "  what IS the   capital of france?\n")

    assert fake_openai.calls == 1
    assert hit["id"] != first["id"]
    assert hit["source_id"] == first["id"]
    assert hit["answer"] == first["answer"]
    assert hit["question"] == "what IS the   capital of france?"  # stored as asked
    listed = app.test_client().get("/questions").get_json()["items"]
    assert [item["id"] for item in listed] == [hit["id"], first["id"]]


def test_fresh_bypasses_the_cache(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    app = make_app(database_url, cache_ttl_s=3600)
    ask(app, QUESTION)

    fresh = ask(app, QUESTION, fresh=True)

    assert fake_openai.calls == 2
    assert fresh["source_id"] is None


def test_another_model_misses(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    ask(make_app(database_url, cache_ttl_s=3600), QUESTION)

    other = ask(make_app(database_url, cache_ttl_s=3600, model="gpt-other"), QUESTION)

    assert fake_openai.calls == 2
    assert other["source_id"] is None
    assert other["model"] == "gpt-other"


def test_an_answer_older_than_the_ttl_misses(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    app = make_app(database_url, cache_ttl_s=60)
    ask(app, QUESTION)
    age_every_record(database_url, by=timedelta(seconds=61))

    again = ask(app, QUESTION)

    assert fake_openai.calls == 2
    assert again["source_id"] is None


def test_a_failed_answer_is_never_served_from_the_cache(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    app = make_app(database_url, cache_ttl_s=3600)
    fake_openai.script(Status(500))
    assert app.test_client().post("/ask", json={"question": QUESTION}).status_code == 503

    answered = ask(app, QUESTION)

    assert fake_openai.calls == 2
    assert answered["source_id"] is None


def _history_with_statistics(
    engine: Engine, count: int, *, failed_every: int = 0, apart: timedelta = timedelta(0)
) -> datetime:
    """Migrate, store `count` answered records (every `failed_every`-th failed), each
    `apart` before the one after it, and ANALYZE them, so the planner plans as it would
    for a real history. Returns the newest one's creation time."""
    migrate.upgrade(engine)
    now = datetime.now(UTC)
    rows = []
    for i in range(count):
        qna = QnA.ask(f"Question number {i}?", model="gpt-test", now=now - i * apart)
        if failed_every and i % failed_every == 0:
            qna.record_failure(LLMTimeout("slow"), latency_ms=1, now=now)
        else:
            qna.record_answer(
                answer="a",
                model="gpt-test",
                prompt_tokens=1,
                completion_tokens=1,
                latency_ms=1,
                now=now,
            )
        rows.append(row_values(qna))
    with engine.begin() as connection:
        connection.execute(insert(qn_a), rows)
        connection.execute(text("ANALYZE qn_a"))
    return now


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_page_deep_in_the_history_starts_at_its_cursor_in_the_index(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A later page is a range of the (created_at, id) index that starts at the cursor,
    not a read of every newer record filtered out one by one."""
    url = (
        sqlite_url(tmp_path / "qna.db")
        if backend == "sqlite"
        else request.getfixturevalue("empty_postgres_url")
    )
    engine = create_engine(url)
    try:
        now = _history_with_statistics(engine, 20000, apart=timedelta(milliseconds=1))
        cursor = PageKey(created_at=now - timedelta(seconds=10), id=UUID(int=0))
        statement = list_statement(limit=21, before=cursor)
        with engine.connect() as connection:
            if backend == "sqlite":
                # The plan does not depend on the values: any of the right kinds.
                sql = "EXPLAIN QUERY PLAN " + str(statement.compile(dialect=connection.dialect))
                values = ("2026-01-01 00:00:00.000000", "0" * 32, 21, 0)
                plan = "\n".join(str(row[-1]) for row in connection.exec_driver_sql(sql, values))
            else:
                compiled = statement.compile(
                    dialect=connection.dialect, compile_kwargs={"literal_binds": True}
                )
                sql = "EXPLAIN " + str(compiled)
                plan = "\n".join(row[0] for row in connection.exec_driver_sql(sql))
    finally:
        engine.dispose()

    assert "ix_qn_a_created_at_id" in plan, plan
    if backend == "sqlite":
        assert "SEARCH qn_a USING INDEX ix_qn_a_created_at_id ((created_at,id)<(?,?))" in plan
    else:
        assert "Index Cond: (ROW(created_at, id) < ROW(" in plan, plan
        assert "Filter" not in plan, plan


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_page_of_failures_reads_their_index_not_the_history(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Failures are few among many answers: the planner finds a page of them (the
    abandoned included) from the partial indexes, not by reading the history. SQLite
    read the history whole for the pending part until their index had `id` (0005)."""
    url = (
        sqlite_url(tmp_path / "qna.db")
        if backend == "sqlite"
        else request.getfixturevalue("empty_postgres_url")
    )
    engine = create_engine(url)
    explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
    try:
        # More failures than a page holds: with fewer, a plan that reads them all
        # and sorts them passes for one that reads a page.
        now = _history_with_statistics(
            engine, 20000, failed_every=100, apart=timedelta(milliseconds=1)
        )
        plans = {}
        for status in (RecordStatus.FAILED, RecordStatus.PENDING):
            statement = list_statement(
                limit=21, status=status, abandoned=Abandonment(now, timedelta(minutes=5))
            )
            with engine.connect() as connection:
                compiled = statement.compile(
                    dialect=connection.dialect, compile_kwargs={"literal_binds": True}
                )
                plans[status] = "\n".join(
                    str(row[-1]) for row in connection.exec_driver_sql(explain + str(compiled))
                )
    finally:
        engine.dispose()

    assert "ix_qn_a_failed_created_at_id" in plans[RecordStatus.FAILED], plans[RecordStatus.FAILED]
    for plan in plans.values():
        assert "ix_qn_a_pending_created_at_id" in plan, plan
    for plan in plans.values():
        assert "Seq Scan" not in plan, plan
        assert "ix_qn_a_created_at_id" not in plan, plan


@pytest.mark.postgres
def test_the_cache_lookup_uses_its_index(empty_postgres_url: str) -> None:
    """With a realistic number of rows and fresh statistics, the planner serves the
    cache look-up in the repository's exact insert from the cache index, not a scan."""
    engine = create_engine(empty_postgres_url)
    try:
        now = _history_with_statistics(engine, 5000)
        asked = QnA.ask("question NUMBER 42?", model="gpt-test", now=now)
        statement, values = add_or_answer_from_cache_statement(
            asked, since=now - timedelta(hours=1), now=now
        )
        with engine.connect() as connection:
            compiled = statement.compile(dialect=connection.dialect)
            # EXPLAIN without ANALYZE plans the insert without running it.
            params = {
                name: str(value) if isinstance(value, UUID) else value
                for name, value in compiled.construct_params(values).items()
            }
            plan = "\n".join(
                row[0] for row in connection.exec_driver_sql("EXPLAIN " + str(compiled), params)
            )
    finally:
        engine.dispose()

    assert "ix_qn_a_question_key_model_created_at" in plan, plan
    assert "Seq Scan" not in plan, plan


# -- the concurrency model ------------------------------------------------------------------------


@pytest.fixture
def slow_llm() -> Iterator[FakeOpenAI]:
    # Long enough that all 50 asks overlap even on a busy machine.
    with FakeOpenAI(latency=2.0) as fake:
        yield fake


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_fifty_asks_wait_on_the_llm_together_with_a_small_pool(
    postgres_server_url: str, slow_llm: FakeOpenAI, tmp_path: Path, worker_class: str
) -> None:
    """50 concurrent asks are all waiting on the LLM at once (so they finish in about one
    LLM latency), while the server never holds more database connections than its pool
    of 4 — because no connection is held during the LLM call."""
    asks = 50
    pool_size = 4
    with scratch_database(postgres_server_url) as url:
        env = serve_env(url, slow_llm, QNA_DB_POOL_SIZE=str(pool_size))
        args = ("--workers", "1", "--worker-class", worker_class, "--threads", "64")
        with serving(env, tmp_path, *args) as server:
            database = url.rsplit("/", 1)[1]
            # Autocommit: inside one transaction PostgreSQL shows the same snapshot of
            # pg_stat_activity to every query, and the peak would never move.
            monitor = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
            stop = threading.Event()
            peak = 0

            def watch_connections() -> None:
                nonlocal peak
                with monitor.connect() as connection:
                    while not stop.is_set():
                        count = connection.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity"
                                " WHERE datname = :db AND pid <> pg_backend_pid()"
                            ),
                            {"db": database},
                        ).scalar_one()
                        peak = max(peak, count)
                        stop.wait(0.02)

            watcher = threading.Thread(target=watch_connections)
            watcher.start()
            try:
                with ThreadPoolExecutor(max_workers=asks) as pool:
                    responses = list(
                        pool.map(
                            lambda i: requests.post(
                                f"{server.url}/ask", json={"question": f"Q{i}?"}, timeout=30
                            ),
                            range(asks),
                        )
                    )
            finally:
                stop.set()
                watcher.join()
                monitor.dispose()

        assert [r.status_code for r in responses] == [201] * asks
        assert slow_llm.max_in_flight == asks
        assert 0 < peak <= pool_size
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                answered = connection.execute(
                    text("SELECT count(*) FROM qn_a WHERE status = 'answered'")
                ).scalar_one()
        finally:
            engine.dispose()
        assert answered == asks
