"""Nothing lost: every ask is stored once and ends answered or failed, whatever breaks.

The HTTP API through Flask's test client, over SQLite and PostgreSQL (`database_url`),
with the LLM played by a local OpenAI-compatible server told to misbehave, and, for the
restart test, a throwaway PostgreSQL cluster that the test stops and starts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from werkzeug.test import TestResponse

from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import create_engine
from qna.adapters.sqlalchemy.repository import SqlAlchemyUnitOfWork
from qna.config import Settings
from qna.container import Container, create_container, shutdown, warm_up
from qna.domain.errors import InvalidQuestion
from qna.domain.model import QnA, parse_question
from tests.integration.conftest import MAX_QUESTION_LENGTH, AppFactory
from tests.support.fake_openai import Delay, Drop, FakeOpenAI, Raw, Reply, Status
from tests.support.pg_cluster import PgCluster, throwaway_cluster

QUESTION = "What is the capital of France?"
TOKENS = ("tok-alpha-7d1f0c9e2b", "tok-beta-55aa3e1c0f")


# Retries on, so that faults are ridden out as in production.
RELIABLE = {
    "llm_max_attempts": 4,
    "llm_timeout_s": 5.0,
    "llm_deadline_s": 30.0,
    "log_level": "INFO",
}


@pytest.fixture
def make_app(make_app: AppFactory) -> AppFactory:
    """The shared app factory (tests/integration/conftest.py) with retries on."""

    def build(database_url: str, **overrides: Any) -> Flask:
        return make_app(database_url, **{**RELIABLE, **overrides})

    return build


@pytest.fixture
def client(make_app: AppFactory, database_url: str) -> FlaskClient:
    return make_app(database_url).test_client()


# -- helpers -------------------------------------------------------------------------------------


def ask(client: FlaskClient, question: object = QUESTION, **kw: Any) -> TestResponse:
    return client.post("/ask", json={"question": question}, **kw)


def error_of(response: TestResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error contract: JSON `{"error": {"code", "message"[, "qna_id"]}}`."""
    raw = response.get_data(as_text=True)
    assert response.status_code == status, raw
    assert response.mimetype == "application/json", raw
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == {"error"}, raw
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], raw
    assert isinstance(error.get("message"), str) and error["message"], raw
    if code is not None:
        assert error["code"] == code, raw
    return dict(error)


def rows(database_url: str) -> list[dict[str, Any]]:
    """Every stored record, read with plain SQL rather than through qna's repository."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            result = connection.execute(text("SELECT id, question, status, error_kind FROM qn_a"))
            # SQLite hands the id back as 32 hex digits, PostgreSQL as a UUID.
            return [{**row._mapping, "id": UUID(str(row._mapping["id"]))} for row in result]
    finally:
        engine.dispose()


def row_by_id(database_url: str, qna_id: str | UUID) -> dict[str, Any]:
    [row] = [row for row in rows(database_url) if row["id"] == UUID(str(qna_id))]
    return row


# -- fault injection -----------------------------------------------------------------------------

RETRY_NOW = {"Retry-After": "0"}

# (script, settings, attempts the LLM saw, HTTP status, code of the failure or None)
FAULTS: dict[str, tuple[list[Any], dict[str, Any], int, int, str | None]] = {
    "429-then-ok": ([Status(429, headers=RETRY_NOW)] * 2, {}, 3, 201, None),
    "429-always": ([Status(429, headers=RETRY_NOW)] * 4, {}, 4, 503, "llm_rate_limited"),
    "500-then-ok": ([Status(500, headers=RETRY_NOW)], {}, 2, 201, None),
    "500-always": ([Status(500, headers=RETRY_NOW)] * 4, {}, 4, 503, "llm_unavailable"),
    "503-backoff-then-ok": ([Status(503)], {}, 2, 201, None),
    "503-always": ([Status(503, headers=RETRY_NOW)] * 4, {}, 4, 503, "llm_unavailable"),
    "slow-then-ok": (
        [Delay(5)],
        {"llm_timeout_s": 1.0, "llm_max_attempts": 2},
        2,
        201,
        None,
    ),
    "slow-always": (
        [Delay(5)] * 2,
        {"llm_timeout_s": 1.0, "llm_max_attempts": 2},
        2,
        504,
        "llm_timeout",
    ),
    "drop-then-ok": ([Drop()], {}, 2, 201, None),
    "drop-always": ([Drop()] * 2, {"llm_max_attempts": 2}, 2, 503, "llm_unavailable"),
    "not-json": ([Raw(body=b"not json")], {}, 1, 502, "llm_bad_response"),
    "no-choices": ([Raw(body=b'{"id": "x", "choices": []}')], {}, 1, 502, "llm_bad_response"),
    "html-200": (
        [Raw(body=b"<html>oops</html>", content_type="text/html")],
        {},
        1,
        502,
        "llm_bad_response",
    ),
    "refused-400": ([Status(400)], {}, 1, 502, "llm_refused"),
    "refused-401": ([Status(401)], {}, 1, 502, "llm_refused"),
}


@pytest.mark.parametrize(
    ("script", "overrides", "attempts", "status", "code"), FAULTS.values(), ids=FAULTS.keys()
)
def test_a_fault_is_retried_as_it_deserves_and_the_outcome_is_stored(
    make_app: AppFactory,
    database_url: str,
    fake_openai: FakeOpenAI,
    script: list[Any],
    overrides: dict[str, Any],
    attempts: int,
    status: int,
    code: str | None,
) -> None:
    client = make_app(database_url, **overrides).test_client()
    fake_openai.script(*script)
    expected: tuple[str, str | None]

    response = ask(client)

    assert fake_openai.calls == attempts
    if code is None:
        assert response.status_code == 201, response.get_data(as_text=True)
        qna_id = response.get_json()["id"]
        expected = ("answered", None)
    else:
        error = error_of(response, status, code)
        if status == 503:
            assert int(response.headers["Retry-After"]) >= 1
        qna_id = error["qna_id"]
        expected = ("failed", code)
    record = client.get(f"/questions/{qna_id}").get_json()
    assert (record["status"], record["error"] and record["error"]["code"]) == expected
    stored = rows(database_url)
    assert len(stored) == 1
    assert (stored[0]["id"], stored[0]["status"], stored[0]["error_kind"]) == (
        UUID(qna_id),
        *expected,
    )


# -- the count: N asks in, N records stored ------------------------------------------------------

N = 100


def test_every_ask_under_random_failures_is_stored_exactly_once(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    app = make_app(database_url, llm_max_attempts=4, log_level="WARNING")
    fake_openai.failure_rate = 0.3
    fake_openai.failure_statuses = (429, 503)
    questions = [f"Question number {i}?" for i in range(N)]

    def one(question: str) -> TestResponse:
        return ask(app.test_client(), question)

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(one, questions))

    answered = [r for r in responses if r.status_code == 201]
    refused = [r for r in responses if r.status_code != 201]
    for response in refused:
        error = error_of(response, response.status_code)
        assert response.status_code == 503, error
        assert error["code"] in {"llm_rate_limited", "llm_unavailable"}
        assert "qna_id" in error  # the failure was stored too
    assert len(answered) >= 95

    stored = rows(database_url)
    assert len(stored) == N
    assert sorted(row["question"] for row in stored) == sorted(questions)
    by_status = {s: sum(1 for row in stored if row["status"] == s) for s in ("answered", "failed")}
    assert by_status == {"answered": len(answered), "failed": len(refused)}
    assert {row["id"] for row in stored} == {UUID(r.get_json()["id"]) for r in answered} | {
        UUID(r.get_json()["error"]["qna_id"]) for r in refused
    }
    # Every failure that ended an ask cost at most 4 attempts; none was retried past that.
    assert N <= fake_openai.calls <= 4 * N


# -- authentication -------------------------------------------------------------------------------


def test_tokens_guard_the_api_but_not_the_probes_and_never_leak(
    make_app: AppFactory,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_app(database_url, api_tokens=",".join(TOKENS), log_level="DEBUG").test_client()
    bodies: list[str] = []

    def seen(response: TestResponse) -> TestResponse:
        bodies.append(response.get_data(as_text=True))
        bodies.extend(f"{name}: {value}" for name, value in response.headers.items())
        return response

    missing = seen(ask(client))
    error_of(missing, 401, "unauthorized")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = seen(ask(client, headers={"Authorization": f"Bearer {TOKENS[0]}x"}))
    error_of(wrong, 401, "unauthorized")
    not_bearer = seen(ask(client, headers={"Authorization": f"Basic {TOKENS[0]}"}))
    error_of(not_bearer, 401, "unauthorized")
    error_of(seen(client.get("/questions")), 401, "unauthorized")
    error_of(seen(client.get("/metrics")), 401, "unauthorized")
    assert rows(database_url) == []

    for token in TOKENS:
        granted = seen(ask(client, headers={"Authorization": f"Bearer {token}"}))
        assert granted.status_code == 201, granted.get_data(as_text=True)
        listed = seen(client.get("/questions", headers={"Authorization": f"Bearer {token}"}))
        assert listed.status_code == 200
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert seen(client.get(path)).status_code == 200, path
    assert len(rows(database_url)) == 2

    captured = capsys.readouterr()
    logged = captured.out + captured.err + caplog.text
    assert logged  # the request log ran, so its silence about tokens means something
    for token in TOKENS:
        assert all(token not in body for body in bodies)
        assert token not in logged


# -- rate limit -----------------------------------------------------------------------------------


def test_without_a_token_it_is_401_even_while_the_database_is_down(
    make_app: AppFactory, fake_openai: FakeOpenAI
) -> None:
    down = "postgresql://qna:qna@127.0.0.1:1/qna"  # nothing listens on port 1
    client = make_app(down, api_tokens=TOKENS[0], db_connect_timeout_s=1).test_client()
    bearer = {"Authorization": f"Bearer {TOKENS[0]}"}

    for response in (ask(client), client.get("/questions"), client.get(f"/questions/{uuid4()}")):
        error_of(response, 401, "unauthorized")
    error_of(client.get("/questions", headers=bearer), 503, "database_unavailable")
    assert fake_openai.calls == 0


def test_the_fourth_request_in_a_minute_is_429_and_not_asked(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    client = make_app(database_url, rate_limit="3/minute").test_client()

    first_three = [ask(client, f"Question {i}?") for i in range(3)]
    fourth = ask(client, "Question 3?")

    assert [r.status_code for r in first_three] == [201, 201, 201]
    assert all("Retry-After" not in r.headers for r in first_three)
    error_of(fourth, 429, "rate_limited")
    assert int(fourth.headers["Retry-After"]) >= 1
    assert fake_openai.calls == 3
    assert len(rows(database_url)) == 3
    # Probes stay unlimited, so an orchestrator never sees the limit.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


# -- properties of the input ----------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
ask_bodies = st.fixed_dictionaries(
    {"question": st.text(max_size=40) | json_values},
    optional={"fresh": st.booleans() | json_values, "model": json_values},
)
questions = (
    st.text(max_size=80)
    | st.text(alphabet=" \t\r\n\u00a0\u200bxé👍\x00\x7f", max_size=12)
    | st.text(min_size=MAX_QUESTION_LENGTH - 2, max_size=MAX_QUESTION_LENGTH + 2, alphabet="ab ")
)
PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def stored_form(question: str) -> str | None:
    """What the domain's parse rules make of a question, or None if they refuse it."""
    try:
        parsed = parse_question(question, max_length=MAX_QUESTION_LENGTH)
    except InvalidQuestion:
        return None
    # The rules as the API documents them, checked independently of the domain's code.
    assert parsed == question.replace("\r\n", "\n").replace("\r", "\n").strip()
    return parsed


@PROPERTY_SETTINGS
@given(question=questions)
def test_any_question_is_stored_as_the_parse_rules_say_or_refused(
    client: FlaskClient, fake_openai: FakeOpenAI, question: str
) -> None:
    response = ask(client, question)

    assert response.status_code < 500, response.get_data(as_text=True)
    expected = stored_form(question)
    if expected is None:
        error_of(response, 400, "invalid_question")
        return
    assert response.status_code == 201, response.get_data(as_text=True)
    qna_id = response.get_json()["id"]
    assert client.get(f"/questions/{qna_id}").get_json()["question"] == expected
    assert fake_openai.requests[-1]["messages"][-1]["content"] == expected


@PROPERTY_SETTINGS
@given(
    body=json_values | ask_bodies,
    ascii_only=st.booleans(),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8"]),
)
def test_no_json_body_is_a_server_error(
    client: FlaskClient, body: object, ascii_only: bool, content_type: str
) -> None:
    # Lone surrogates cannot be UTF-8: sent raw (not ascii_only), they make invalid
    # UTF-8 on purpose.
    response = client.post(
        "/ask",
        data=json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
        content_type=content_type,
    )

    assert response.status_code < 500, response.get_data(as_text=True)
    valid = (
        isinstance(body, dict)
        and isinstance(body.get("question"), str)
        and isinstance(body.get("fresh", False), bool)
        and stored_form(body["question"]) is not None
    )
    if not valid:
        error_of(response, 400)
        return
    assert isinstance(body, dict)
    assert response.status_code == 201, response.get_data(as_text=True)
    qna_id = response.get_json()["id"]
    assert client.get(f"/questions/{qna_id}").get_json()["question"] == stored_form(
        body["question"]
    )


EXACT = {
    "emoji": "Is 🧑🏽‍🚀 an astronaut? 🇫🇷🏳️‍🌈 ❤️ 1️⃣",
    "zwj-family": "👨‍👩‍👧‍👦 vs 👨\u200d👩\u200d👧",
    "rtl-arabic": "ما هي عاصمة فرنسا؟",
    "rtl-hebrew-points": "מַה הִיא בִּירַת צָרְפַת?",
    "bidi-controls": "abc \u202bעברית\u202c \u2067x\u2069 \u200f",  # noqa: RUF001 (look-alikes on purpose)
    "combining-nfd": "Cafe\u0301 Åström vs A\u030astro\u0308m",
    "zalgo": "Z̵̡̢̛̗̘̙̜̝̞̟̠a̷̡̢̛l̴̨̛g̶̢̛o̷̧̕",
    "astral": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓂀 \U0001f9ea \U0010fffd",  # noqa: RUF001 (look-alikes on purpose)
    "cjk-fullwidth": "日本の首都は？　ＡＢＣ",  # noqa: RUF001 (look-alikes on purpose)
    "sql-drop": "'; DROP TABLE qn_a; --",
    "sql-union": "x' UNION SELECT id, question FROM qn_a WHERE '1'='1",
    "sql-params": "%s %(name)s :name $1 ? {0} \\x00 \\'",
    "sql-comment": "/* */ -- ; BEGIN; DELETE FROM qn_a; COMMIT;",
    "quotes-backslashes": "\"'`\\\\\\ \\n \\u0000",
    "inner-newline-and-tab": "line one\nline two\tTabbed",
}


@pytest.mark.parametrize("question", EXACT.values(), ids=EXACT.keys())
def test_hard_text_round_trips_byte_exact(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, question: str
) -> None:
    body = ask(client, question).get_json()

    fetched = client.get(f"/questions/{body['id']}").get_json()

    assert body["question"].encode() == question.encode()
    assert fetched["question"].encode() == question.encode()
    assert fake_openai.requests[-1]["messages"][-1]["content"].encode() == question.encode()
    # Straight from the table: stored as given, and the table is still there, whole.
    stored = rows(database_url)
    assert [row["question"].encode() for row in stored] == [question.encode()]
    assert stored[0]["status"] == "answered"


# -- abandoned pending records --------------------------------------------------------------------


def test_a_long_pending_record_is_closed_as_abandoned_when_read(
    make_app: AppFactory, database_url: str
) -> None:
    app = make_app(database_url)
    container: Container = app.extensions["qna.container"]
    now = datetime.now(UTC)
    stale = QnA.ask("Asked by a process that died", model="gpt-test", now=now - timedelta(days=1))
    fresh = QnA.ask("Still being answered", model="gpt-test", now=now)
    with SqlAlchemyUnitOfWork(container.engine()) as uow:
        uow.qnas.add(stale)
        uow.qnas.add(fresh)
        uow.commit()
    client = app.test_client()

    got = client.get(f"/questions/{stale.id}")

    assert got.status_code == 200
    record = got.get_json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "abandoned"
    assert record["answer"] is None
    assert row_by_id(database_url, stale.id)["status"] == "failed"
    assert row_by_id(database_url, stale.id)["error_kind"] == "abandoned"
    # A record within the longest possible ask is left alone, by GET and by the history.
    assert client.get(f"/questions/{fresh.id}").get_json()["status"] == "pending"
    statuses = {item["id"]: item["status"] for item in client.get("/questions").get_json()["items"]}
    assert statuses == {str(stale.id): "failed", str(fresh.id): "pending"}
    assert row_by_id(database_url, fresh.id)["status"] == "pending"


def test_the_history_closes_abandoned_records_too(make_app: AppFactory, database_url: str) -> None:
    app = make_app(database_url)
    container: Container = app.extensions["qna.container"]
    old = datetime.now(UTC) - timedelta(hours=2)
    stale = [
        QnA.ask(f"Lost {i}", model="gpt-test", now=old + timedelta(seconds=i)) for i in range(3)
    ]
    with SqlAlchemyUnitOfWork(container.engine()) as uow:
        for record in stale:
            uow.qnas.add(record)
        uow.commit()

    items = app.test_client().get("/questions").get_json()["items"]

    assert [(i["status"], i["error"]["code"]) for i in items] == [("failed", "abandoned")] * 3
    assert {(r["status"], r["error_kind"]) for r in rows(database_url)} == {("failed", "abandoned")}


# -- the database restarts under a running app ----------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.mark.postgres
@pytest.mark.slow
def test_the_same_app_recovers_when_the_database_restarts(
    make_app: AppFactory, cluster: PgCluster, fake_openai: FakeOpenAI
) -> None:
    # A brand-new, unmigrated database: the first ask migrates it.
    client = make_app(cluster.url, db_connect_timeout_s=2).test_client()
    before = ask(client, "Before the restart?")
    assert before.status_code == 201, before.get_data(as_text=True)
    assert client.get("/readyz").status_code == 200

    cluster.stop()
    down = ask(client, "While it is down?")
    down_ready = client.get("/readyz")
    down_history = client.get("/questions")
    alive = client.get("/healthz")

    error_of(down, 503, "database_unavailable")
    assert int(down.headers["Retry-After"]) >= 1
    error_of(down_ready, 503, "database_unavailable")
    error_of(down_history, 503, "database_unavailable")
    assert alive.status_code == 200
    assert fake_openai.calls == 1  # nothing is asked that could not be recorded

    cluster.start()
    after = ask(client, "After the restart?")

    assert after.status_code == 201, after.get_data(as_text=True)
    assert client.get("/readyz").status_code == 200
    assert client.get(f"/questions/{before.get_json()['id']}").status_code == 200
    assert fake_openai.calls == 2
    assert sorted((r["question"], r["status"]) for r in rows(cluster.url)) == [
        ("After the restart?", "answered"),
        ("Before the restart?", "answered"),
    ]


@pytest.mark.postgres
@pytest.mark.slow
def test_the_first_ask_after_a_quiet_restart_succeeds(
    make_app: AppFactory, cluster: PgCluster, fake_openai: FakeOpenAI
) -> None:
    # Nothing is asked while the database is down, so nothing has told the pool: its
    # connections are dead, and each must be replaced when it is checked out.
    client = make_app(cluster.url, db_connect_timeout_s=2).test_client()
    before = [ask(client, f"Before {i}?") for i in range(3)]
    assert [r.status_code for r in before] == [201] * 3

    cluster.stop()
    cluster.start()
    after = [ask(client, f"After {i}?") for i in range(3)]

    assert [r.status_code for r in after] == [201] * 3, after[0].get_data(as_text=True)
    assert fake_openai.calls == 6
    assert {r["status"] for r in rows(cluster.url)} == {"answered"}


@pytest.mark.postgres
def test_asks_go_on_when_the_database_kills_the_pooled_connections(
    make_app: AppFactory, empty_postgres_url: str, fake_openai: FakeOpenAI
) -> None:
    database_url = empty_postgres_url  # its own database: the kill touches nothing else
    client = make_app(database_url).test_client()
    assert ask(client, "Warm the pool?").status_code == 201
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            killed = connection.execute(
                text(
                    # With a timeout it returns once each backend has exited (PostgreSQL 14+),
                    # so the server has closed the sockets before the next ask.
                    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert killed >= 1

    after = [ask(client, f"After the kill {i}?") for i in range(3)]

    assert [r.status_code for r in after] == [201] * 3, after[0].get_data(as_text=True)
    assert len(rows(database_url)) == 4


def test_an_answer_past_what_the_database_holds_is_stored_not_lost(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str
) -> None:
    # NUL cannot be in PostgreSQL text; the model column holds 200 characters; token
    # counts are 32-bit. The LLM has answered: store the answer, not a 500.
    fake_openai.script(
        Reply(text="Paris\x00.", model="m" * 300, prompt_tokens=2**31, completion_tokens=-1)
    )

    response = ask(client)

    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert body["answer"] == "Paris\ufffd."
    assert body["response_model"] == "m" * 200
    assert (body["prompt_tokens"], body["completion_tokens"]) == (None, None)
    stored = client.get(f"/questions/{body['id']}").get_json()
    assert stored == body
    assert row_by_id(database_url, body["id"])["status"] == "answered"


def test_a_provider_error_and_answer_with_nul_or_surrogates_are_stored_not_lost(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str
) -> None:
    # psycopg2 refuses to send a string with NUL: the failure, and the answer of a
    # model named so, were a 500 and a record left pending.
    fake_openai.script(
        Status(400, body={"error": {"message": "bad\x00request \ud83d", "type": "x"}}),
        Reply(text="Paris \ud83d", model="gpt\x00-x"),
    )

    failed, answered = ask(client, "First?"), ask(client, "Second?")

    error = error_of(failed, 502, "llm_refused")
    assert "bad\ufffdrequest \ufffd" in error["message"]
    assert row_by_id(database_url, error["qna_id"])["status"] == "failed"
    assert answered.status_code == 201, answered.get_data(as_text=True)
    body = answered.get_json()
    assert (body["answer"], body["response_model"]) == ("Paris \ufffd", "gpt\ufffd-x")
    assert row_by_id(database_url, body["id"])["status"] == "answered"


@pytest.mark.postgres
def test_an_ask_stuck_behind_a_lock_is_told_the_database_is_unavailable(
    make_app: AppFactory, empty_postgres_url: str, fake_openai: FakeOpenAI
) -> None:
    database_url = empty_postgres_url  # its own database: the lock blocks nothing else
    client = make_app(database_url, db_statement_timeout_s=0.3).test_client()
    assert ask(client, "Before the lock?").status_code == 201  # migrates, warms the pool
    locker = create_engine(database_url)
    try:
        with locker.connect() as connection, ThreadPoolExecutor(1) as pool:
            connection.begin()
            # Held until the rollback: every statement on the table waits for it.
            connection.execute(text("LOCK TABLE qn_a IN ACCESS EXCLUSIVE MODE"))
            try:
                # In a thread, so that without a timeout this fails instead of hanging.
                stuck = pool.submit(ask, client, "Behind the lock?").result(timeout=30)
                history = pool.submit(client.get, "/questions").result(timeout=30)
            finally:
                connection.rollback()
        after = ask(client, "After the lock?")
    finally:
        locker.dispose()

    error = error_of(stuck, 503, "database_unavailable")
    assert "statement timeout" in error["message"]
    error_of(history, 503, "database_unavailable")
    assert fake_openai.calls == 2  # the stuck ask was not stored, so never asked
    assert after.status_code == 201, after.get_data(as_text=True)
    assert sorted(r["question"] for r in rows(database_url)) == [
        "After the lock?",
        "Before the lock?",
    ]


@pytest.mark.postgres
def test_a_migration_may_wait_longer_than_the_statement_timeout(empty_postgres_url: str) -> None:
    # Another process is migrating: the upgrade waits for its advisory lock, well past
    # the statement timeout every other statement has.
    engine = create_engine(empty_postgres_url, statement_timeout=0.2)
    holder = create_engine(empty_postgres_url)
    try:
        with holder.connect() as connection, connection.begin():
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": migrate._MIGRATION_LOCK_KEY}
            )
            upgrading = threading.Thread(target=migrate.upgrade, args=(engine,))
            upgrading.start()
            upgrading.join(timeout=1.0)
            assert upgrading.is_alive()  # waiting for the lock, not cancelled
        upgrading.join(timeout=60)
        assert migrate.is_at_head(engine)
        with engine.connect() as connection:  # ordinary statements keep the limit
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "200ms"
    finally:
        engine.dispose()
        holder.dispose()


@pytest.mark.postgres
def test_database_connections_probe_a_silent_server(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            fd = connection.connection.driver_connection.fileno()  # type: ignore[union-attr]
            sock = socket.socket(fileno=os.dup(fd))
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    # No TCP, nothing to probe; CI reaches its database over TCP, so
                    # there this is a broken set-up, not a test to skip.
                    if os.environ.get("CI"):
                        pytest.fail("CI's test database must be reached over TCP")
                    pytest.skip("the test database is reached over a Unix socket")
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                if hasattr(socket, "TCP_KEEPIDLE"):
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                if hasattr(socket, "TCP_USER_TIMEOUT"):
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
            finally:
                sock.close()
    finally:
        engine.dispose()


# -- known bugs, pinned ---------------------------------------------------------------------------


def test_a_retry_with_the_key_of_an_abandoned_ask_asks_again(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    client = make_app(database_url, idempotency_wait_s=0.3).test_client()
    key = {"Idempotency-Key": "retry-after-crash"}
    first = ask(client, headers=key)
    assert first.status_code == 201
    # As the row stands when the process asking the LLM died an hour ago.
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE qn_a SET status = 'pending', answer = NULL, answered_at = NULL,"
                    " response_model = NULL, created_at = :then, abandon_at = :deadline"
                ),
                {
                    "then": datetime.now(UTC) - timedelta(hours=1),
                    "deadline": datetime.now(UTC) - timedelta(minutes=57),
                },
            )
    finally:
        engine.dispose()

    retried = ask(client, headers=key)

    assert retried.status_code == 201, retried.get_data(as_text=True)
    assert fake_openai.calls == 2
    abandoned = row_by_id(database_url, first.get_json()["id"])
    assert (abandoned["status"], abandoned["error_kind"]) == ("failed", "abandoned")


def test_a_cold_burst_of_requests_builds_one_engine_and_one_llm_client(
    fake_openai: FakeOpenAI, database_url: str
) -> None:
    """Entry points warm the container up before threads share it."""
    threads = 32
    for _ in range(3):
        container = create_container(
            Settings(
                _env_file=None, database_url=database_url, openai_base_url=fake_openai.base_url
            )
        )
        warm_up(container)
        barrier = threading.Barrier(threads)

        def first_request(
            _: int, container: Container = container, barrier: threading.Barrier = barrier
        ) -> tuple[Any, Any]:
            barrier.wait(timeout=10)
            return container.engine(), container.llm()

        with ThreadPoolExecutor(max_workers=threads) as pool:
            built = list(pool.map(first_request, range(threads)))
        engines = {id(engine): engine for engine, _ in built}
        llms = {id(llm): llm for _, llm in built}
        shutdown(container)
        for engine in engines.values():  # the ones shutdown does not know about
            engine.dispose()
        for llm in llms.values():
            llm.close()
        assert len(engines) == 1
        assert len(llms) == 1
