"""The HTTP API through Flask's test client: every route, every error, hostile bodies.

Each test runs on SQLite and on PostgreSQL (the `database_url` fixture), with the LLM
played by a local OpenAI-compatible server.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import json
import logging
import re
import threading
import time
import unicodedata
from collections.abc import Callable
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit
from uuid import UUID, uuid4

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask, abort
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from werkzeug.test import TestResponse

from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import create_engine, sqlite_url
from qna.config import ConfigurationError
from qna.entrypoints.http import server, swagger_ui
from qna.entrypoints.presenters import QnAOut
from tests.integration.conftest import MAX_BODY_BYTES, MAX_QUESTION_LENGTH, AppFactory
from tests.support.databases import (
    BROKEN_SQLITE_FILES,
    WRONG_PASSWORD,
    broken_sqlite_file,
    migrate_as_a_newer_qna,
    with_missing_database,
    with_wrong_password,
)
from tests.support.fake_openai import DEFAULT_ANSWER, Delay, Drop, FakeOpenAI, Raw, Reply, Status

QUESTION = "What is the capital of France?"
UNREACHABLE_DATABASE = "postgresql://u:p@127.0.0.1:1/x"
HEX_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


# -- helpers -------------------------------------------------------------------------------


def ask(
    client: FlaskClient,
    question: object,
    headers: dict[str, str] | None = None,
    **fields: object,
) -> TestResponse:
    return client.post("/ask", json={"question": question, **fields}, headers=headers or {})


def post_raw(
    client: FlaskClient, body: bytes, content_type: str | None = "application/json", **kw: Any
) -> TestResponse:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return client.post("/ask", data=body, headers=headers, **kw)


def assert_error(
    response: TestResponse, status: int, code: str, *, record: bool = False
) -> dict[str, Any]:
    """The one error contract: JSON `{"error": {"code", "message"[, "qna_id"]}}`, and
    a "record" beside it only where one is expected (an outcome the database refused)."""
    raw = response.get_data(as_text=True)
    assert response.status_code == status, raw
    assert response.mimetype == "application/json", response.content_type
    assert "Traceback" not in raw
    assert "<html" not in raw.lower()
    body = response.get_json()
    assert isinstance(body, dict)
    assert set(body) == ({"error", "record"} if record else {"error"}), body
    error = body["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "qna_id"}, error
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["code"] == code, error
    return dict(error)


def assert_documented_error_body(app: Flask, response: TestResponse) -> None:
    """The body of an error of POST /ask is what the app's OpenAPI document says it is
    (schemathesis cannot make the database refuse an outcome, so it never sees one)."""
    document = app.test_client().get("/openapi.json").get_json()
    documented = document["paths"]["/ask"]["post"]["responses"][str(response.status_code)]
    schema = {
        **documented["content"]["application/json"]["schema"],
        "components": document["components"],
    }
    body = response.get_json()
    jsonschema_rs.validator_for(schema).validate(body)
    # Declared, not merely let through (the schema does not forbid other members).
    assert set(body) <= set(document["components"]["schemas"]["ErrorResponse"]["properties"])


def stored_rows(database_url: str) -> list[dict[str, Any]]:
    """Every stored record, read with plain SQL rather than through the API."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            result = connection.execute(text("SELECT id, question, status, error_kind FROM qn_a"))
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def created(response: TestResponse) -> dict[str, Any]:
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body, dict)
    return body


def cursor_of(payload: object) -> str:
    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# -- POST /ask, GET /questions/<id> ----------------------------------------------------------


def test_ask_answers_stores_and_links_the_record(
    client: FlaskClient, fake_openai: FakeOpenAI
) -> None:
    response = client.post("/ask", json={"question": "What is the capital of France?"})

    assert response.status_code == 201
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert UUID(body["id"])
    assert body["question"] == QUESTION
    assert body["answer"] == DEFAULT_ANSWER
    assert body["model"] == "gpt-test"
    assert body["response_model"] == "gpt-test"
    assert body["status"] == "answered"
    assert body["error"] is None
    assert body["source_id"] is None
    assert body["prompt_tokens"] == len(QUESTION.split())
    assert body["completion_tokens"] == len(DEFAULT_ANSWER.split())
    assert body["finish_reason"] == "stop"
    assert isinstance(body["latency_ms"], int)
    assert body["latency_ms"] >= 0
    asked = datetime.fromisoformat(body["created_at"])
    answered = datetime.fromisoformat(body["answered_at"])
    assert asked.utcoffset() is not None
    assert asked <= answered
    assert HEX_REQUEST_ID.fullmatch(response.headers["X-Request-ID"])
    assert fake_openai.calls == 1
    assert fake_openai.requests[0]["messages"][-1]["content"] == QUESTION

    # Relative (RFC 9110): right at the root and under a proxy's prefix alike.
    location = response.headers["Location"]
    assert location == f"questions/{body['id']}"
    assert urljoin("http://qna.example/qna/ask", location) == (
        f"http://qna.example/qna/questions/{body['id']}"
    )
    fetched = client.get(urljoin("/ask", location))
    assert fetched.status_code == 200
    assert fetched.get_json() == body


def test_the_record_is_in_the_database(client: FlaskClient, database_url: str) -> None:
    body = created(ask(client, QUESTION))

    [row] = stored_rows(database_url)
    assert UUID(str(row["id"])) == UUID(body["id"])
    assert row["question"] == QUESTION
    assert row["status"] == "answered"


@pytest.mark.parametrize("request_id", ["abc-123", "a" * 128, "req.1:2_3-x"])
def test_a_sane_request_id_is_echoed(client: FlaskClient, request_id: str) -> None:
    for response in (
        client.get("/healthz", headers={"X-Request-ID": request_id}),
        client.post("/ask", json={"question": ""}, headers={"X-Request-ID": request_id}),
    ):
        assert response.headers["X-Request-ID"] == request_id


@pytest.mark.parametrize(
    "request_id",
    ["a" * 300, "a b", "", "ünïcode", "x\ty", "<script>", "a" * 129],
    ids=["300-chars", "space", "empty", "non-ascii", "tab", "markup", "129-chars"],
)
def test_an_insane_request_id_is_replaced(client: FlaskClient, request_id: str) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": request_id})

    assert response.headers["X-Request-ID"] != request_id
    assert HEX_REQUEST_ID.fullmatch(response.headers["X-Request-ID"])


def test_every_response_gets_a_fresh_request_id(client: FlaskClient) -> None:
    ids = {client.get(path).headers["X-Request-ID"] for path in ("/healthz", "/nope", "/ask")}

    assert len(ids) == 3


def test_records_and_errors_are_neither_sniffed_nor_cached(client: FlaskClient) -> None:
    # They echo what an LLM or a client wrote (an error message with "<script>"), and
    # are one caller's questions: no browser reads them as HTML, no shared cache keeps them.
    created = client.post("/ask", json={"question": "<script>alert(1)</script>?"})
    for response in (
        created,
        client.get(urljoin("/ask", created.headers["Location"])),
        client.get("/questions"),
        client.get("/questions?limit=0"),
        client.post("/ask", json={}),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
    docs = client.get("/docs")
    assert docs.headers["X-Content-Type-Options"] == "nosniff"
    assert "Cache-Control" not in docs.headers  # the same page for everyone


def test_flask_serves_no_static_folder(client: FlaskClient) -> None:
    # qna has none; Flask's default /static/<path> route answered for it all the same.
    assert "static" not in {rule.endpoint for rule in client.application.url_map.iter_rules()}
    assert client.get("/static/app.js").json["error"]["code"] == "not_found"


def test_get_one_record(client: FlaskClient) -> None:
    body = created(ask(client, QUESTION))

    response = client.get(f"/questions/{body['id']}")

    assert response.status_code == 200
    assert response.get_json() == body


def test_an_unknown_id_is_404(client: FlaskClient) -> None:
    assert_error(client.get(f"/questions/{uuid4()}"), 404, "not_found")


@pytest.mark.parametrize(
    "qna_id",
    ["not-a-uuid", "1", "%00", "%ff%fe", "' OR 1=1 --", "a" * 5000, "00000000-0000-0000-0000"],
)
def test_a_malformed_id_is_404(client: FlaskClient, qna_id: str) -> None:
    assert_error(client.get(f"/questions/{qna_id}"), 404, "not_found")


def test_the_start_of_an_id_is_404_saying_the_whole_id_is_needed(client: FlaskClient) -> None:
    # `qna show` takes the start of an id; the API does not, and "No question with
    # id 8478fd85." read as if the record were not there.
    record = created(ask(client, QUESTION))

    error = assert_error(client.get(f"/questions/{record['id'][:8]}"), 404, "not_found")

    assert error["message"] == (
        f"No question with id {record['id'][:8]}: that is the start of an id at most; "
        "give the whole id (32 hex digits, hyphens or none)."
    )


def test_an_id_in_another_spelling_finds_the_same_record(client: FlaskClient) -> None:
    body = created(ask(client, QUESTION))

    response = client.get(f"/questions/{body['id'].upper()}")

    assert response.status_code == 200
    assert response.get_json()["id"] == body["id"]


def test_two_apps_keep_to_their_own_databases(make_app: AppFactory, tmp_path: Path) -> None:
    first_url, second_url = (sqlite_url(tmp_path / f"{name}.db") for name in ("a", "b"))
    for url in (first_url, second_url):
        engine = create_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
    first = make_app(first_url).test_client()
    make_app(second_url)

    created(ask(first, QUESTION))

    assert [row["question"] for row in stored_rows(first_url)] == [QUESTION]
    assert stored_rows(second_url) == []


# -- GET /questions ----------------------------------------------------------------------------


def test_history_is_newest_first(client: FlaskClient) -> None:
    ids = [created(ask(client, f"question {n}"))["id"] for n in range(3)]

    response = client.get("/questions")

    assert response.status_code == 200
    body = response.get_json()
    assert [item["id"] for item in body["items"]] == ids[::-1]
    assert body["next"] is None


def test_an_empty_history(client: FlaskClient) -> None:
    response = client.get("/questions")

    assert response.status_code == 200
    assert response.get_json() == {"items": [], "next": None}


def test_pages_cover_every_record_exactly_once(client: FlaskClient) -> None:
    ids = [created(ask(client, f"question {n}"))["id"] for n in range(7)]

    seen: list[str] = []
    sizes: list[int] = []
    url = "/questions?limit=3"
    while True:
        response = client.get(url)
        assert response.status_code == 200
        body = response.get_json()
        sizes.append(len(body["items"]))
        seen += [item["id"] for item in body["items"]]
        if body["next"] is None:
            break
        url = f"/questions?limit=3&cursor={body['next']}"

    assert sizes == [3, 3, 1]
    assert seen == ids[::-1]


def test_the_default_page_is_twenty(client: FlaskClient) -> None:
    for n in range(21):
        created(ask(client, f"question {n}"))

    body = client.get("/questions").get_json()

    assert len(body["items"]) == 20
    assert body["next"]
    rest = client.get(f"/questions?cursor={body['next']}").get_json()
    assert len(rest["items"]) == 1
    assert rest["next"] is None


# Leading zeros write the same integer (as `qna history -n 0005` reads it): accepted
# however many, since only the digits after them can make a number too long.
@pytest.mark.parametrize("limit", ["1", "100", "007", "0005", "0100", "0" * 50 + "1"])
def test_limits_in_range_are_accepted(client: FlaskClient, limit: str) -> None:
    assert client.get(f"/questions?limit={limit}").status_code == 200


def test_a_limit_with_leading_zeros_is_its_number(client: FlaskClient) -> None:
    for n in range(3):
        created(ask(client, f"question {n}"))

    body = client.get("/questions?limit=0002").get_json()

    assert len(body["items"]) == 2


@pytest.mark.parametrize(
    "limit",
    [
        "0",
        "0000",
        "101",
        "0101",
        "abc",
        "-1",
        "1.5",
        "",
        " 5",
        "1e2",
        "0x10",
        "²",
        "9" * 5000,
    ],
    ids=lambda limit: repr(limit[:12]),
)
def test_a_bad_limit_is_400(client: FlaskClient, limit: str) -> None:
    assert_error(client.get("/questions", query_string={"limit": limit}), 400, "invalid_argument")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "!!!",
        "A" * 201,
        cursor_of({"a": 1}),
        cursor_of(["not a date", str(uuid4())]),
        cursor_of(["2020-01-01T00:00:00+00:00", "not a uuid"]),
        cursor_of(["2020-01-01T00:00:00", str(uuid4())]),  # no time zone
        cursor_of([1, 2]),
        cursor_of(["9999-12-31T23:59:59-23:59", str(uuid4())]),
        cursor_of(["0001-01-01T00:00:00+14:00", str(uuid4())]),
        # Say from `jq -r '.next // empty'` after the last page: read as no cursor, it
        # was the first page again, and a script paging on looped for ever (as the CLI
        # and the Python API did).
        "",
    ],
    ids=[
        "word",
        "punctuation",
        "too-long",
        "object",
        "bad-date",
        "bad-uuid",
        "naive",
        "numbers",
        "overflow",
        "underflow",
        "empty",
    ],
)
def test_a_garbage_cursor_is_400(client: FlaskClient, cursor: str) -> None:
    assert_error(client.get("/questions", query_string={"cursor": cursor}), 400, "invalid_cursor")


@pytest.mark.parametrize(
    "query",
    ["limit=1&limit=abc", "limit=5&limit=5", "cursor=garbage&cursor=", "limit=2&cursor=&cursor="],
)
def test_a_parameter_given_twice_is_400(client: FlaskClient, query: str) -> None:
    # Which of the two was meant? Taking the first quietly answered another question.
    for _ in range(3):
        created(ask(client, QUESTION))

    error = assert_error(client.get(f"/questions?{query}"), 400, "invalid_argument")
    assert "once" in error["message"]


# -- health, readiness, metrics, docs --------------------------------------------------------


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz(client: FlaskClient) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ready"}


def test_without_a_database_readyz_is_503_and_healthz_200(make_app: AppFactory) -> None:
    client = make_app(UNREACHABLE_DATABASE).test_client()

    response = client.get("/readyz")
    assert_error(response, 503, "database_unavailable")
    # As every other 503 a wait can mend (the README's table).
    assert int(response.headers["Retry-After"]) >= 1
    assert client.get("/healthz").status_code == 200


def test_with_tokens_on_readyz_tells_the_log_not_anyone_why_the_database_fails(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The probe asks for no token: the driver's words (a host name, a user or database
    # name, the server's address) were anyone's to read. The routes that need a token
    # still tell their callers.
    url = "postgresql://qna@db-primary.corp.invalid:5432/qna"
    client = make_app(url, api_tokens="t0ken").test_client()
    logger = logging.getLogger("qna.http")  # its lines go to qna's own handler only
    logger.addHandler(caplog.handler)
    try:
        response = client.get("/readyz")
    finally:
        logger.removeHandler(caplog.handler)
    asked = client.get("/questions", headers={"Authorization": "Bearer t0ken"})

    assert_error(response, 503, "database_unavailable")
    assert "db-primary" not in response.get_data(as_text=True)
    assert response.get_json()["error"]["message"] == (
        "The database cannot be used; the server's log says why."
    )
    assert any("db-primary.corp.invalid" in r.getMessage() for r in caplog.records)
    assert_error(asked, 503, "database_unavailable")
    assert "db-primary.corp.invalid" in asked.get_json()["error"]["message"]


def test_without_a_database_asking_is_503_and_the_llm_is_not_asked(
    make_app: AppFactory, fake_openai: FakeOpenAI
) -> None:
    client = make_app(UNREACHABLE_DATABASE).test_client()

    response = ask(client, QUESTION)

    assert_error(response, 503, "database_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    assert fake_openai.calls == 0
    assert_error(client.get("/questions"), 503, "database_unavailable")
    assert_error(client.get(f"/questions/{uuid4()}"), 503, "database_unavailable")


@pytest.mark.parametrize(
    "wrong", [with_wrong_password, with_missing_database], ids=["password", "database-name"]
)
def test_a_wrong_database_login_is_503_misconfigured_on_every_route(
    make_app: AppFactory, fake_openai: FakeOpenAI, postgres_url: str, wrong: Callable[[str], str]
) -> None:
    # It was 503 database_unavailable with Retry-After: clients waited and retried
    # what only fixing DATABASE_URL mends. Told as a missing API key is.
    client = make_app(wrong(postgres_url)).test_client()

    for response in (
        ask(client, QUESTION),
        client.get("/questions"),
        client.get(f"/questions/{uuid4()}"),
        client.get("/readyz"),
    ):
        error = assert_error(response, 503, "misconfigured")
        assert "DATABASE_URL" in error["message"]
        assert WRONG_PASSWORD not in error["message"]
        assert "Retry-After" not in response.headers
    assert fake_openai.calls == 0


# Each wrong on its face: no database could make it right.
REQUESTS_WRONG_ON_THEIR_FACE = [
    ("post", "/ask", {"data": b"{not json", "content_type": "application/json"}, "invalid_json"),
    ("post", "/ask", {"json": {"question": 42}}, "invalid_request"),
    ("post", "/ask", {"json": {"question": "   "}}, "invalid_question"),
    (
        "post",
        "/ask",
        {"json": {"question": QUESTION}, "headers": {"Idempotency-Key": "a,b"}},
        "invalid_argument",
    ),
    ("get", "/questions?limit=0", {}, "invalid_argument"),
    ("get", "/questions?cursor=garbage", {}, "invalid_cursor"),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "code"),
    REQUESTS_WRONG_ON_THEIR_FACE,
    ids=[code + ":" + path for _, path, _, code in REQUESTS_WRONG_ON_THEIR_FACE],
)
def test_without_a_database_a_request_wrong_on_its_face_is_still_400(
    make_app: AppFactory,
    fake_openai: FakeOpenAI,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    code: str,
) -> None:
    # A 503 would have the client wait and send the same mistake again.
    client = make_app(UNREACHABLE_DATABASE).test_client()

    assert_error(getattr(client, method)(path, **kwargs), 400, code)
    assert fake_openai.calls == 0


def test_a_request_wrong_on_its_face_does_not_touch_the_database(
    make_app: AppFactory, tmp_path: Path
) -> None:
    database = tmp_path / "qna.db"
    client = make_app(sqlite_url(database)).test_client()

    for _, path, kwargs, code in REQUESTS_WRONG_ON_THEIR_FACE:
        method = getattr(client, "post" if path == "/ask" else "get")
        assert_error(method(path, **kwargs), 400, code)
    assert_error(post_raw(client, b"{}", content_type="text/plain"), 415, "unsupported_media_type")

    # Not even the first request's migration: nothing asked the database for anything.
    assert not database.exists()
    created(ask(client, QUESTION))
    assert database.exists()


def test_an_id_that_is_none_on_its_face_is_404_without_a_database(
    make_app: AppFactory, tmp_path: Path
) -> None:
    # It was 503 with the database down: a client told to wait for a record no id
    # of that form can name.
    database = tmp_path / "qna.db"
    for url in (UNREACHABLE_DATABASE, sqlite_url(database)):
        client = make_app(url).test_client()

        assert_error(client.get("/questions/not-an-id"), 404, "not_found")
        assert_error(client.get("/questions/3f0c2c4e"), 404, "not_found")  # a start: full ids only
    assert not database.exists()


@pytest.mark.parametrize("kind", BROKEN_SQLITE_FILES)
def test_a_sqlite_file_that_is_not_a_database_is_503(
    make_app: AppFactory, fake_openai: FakeOpenAI, tmp_path: Path, kind: str
) -> None:
    client = make_app(broken_sqlite_file(tmp_path / "qna.db", kind)).test_client()

    for response in (
        ask(client, QUESTION),
        client.get("/questions"),
        client.get(f"/questions/{uuid4()}"),
        client.get("/readyz"),
    ):
        assert_error(response, 503, "database_unavailable")
        # Waiting does not mend the file: Retry-After would send clients back for ever.
        assert "Retry-After" not in response.headers
    assert fake_openai.calls == 0


def test_an_app_without_an_llm_setting_answers_503_misconfigured(
    make_app: AppFactory, database_url: str
) -> None:
    client = make_app(database_url, openai_api_key=None, openai_base_url=None).test_client()

    error = assert_error(ask(client, QUESTION), 503, "misconfigured")

    assert "OPENAI_API_KEY" in error["message"]
    assert stored_rows(database_url) == []


def test_an_invalid_question_is_400_from_an_app_without_an_llm_setting_too(
    make_app: AppFactory, database_url: str
) -> None:
    # Before: 503 misconfigured, as if the question would do once the key was set.
    client = make_app(database_url, openai_api_key=None, openai_base_url=None).test_client()

    assert_error(ask(client, "   "), 400, "invalid_question")
    assert stored_rows(database_url) == []


def test_a_sqlite_directory_on_a_full_disk_is_503_until_there_is_room(
    make_app: AppFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker built its engine as it started, and died of a full disk (gunicorn
    # then stopped the whole server); it now waits, as for a database that is down.
    make_directory = Path.mkdir
    disk_full = True

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        make_directory(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    client = make_app(sqlite_url(tmp_path / "data" / "qna.db")).test_client()

    assert client.get("/healthz").status_code == 200
    refused = client.get("/questions")
    error = assert_error(refused, 503, "database_unavailable")
    assert "no space left on device" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1

    disk_full = False
    assert client.get("/readyz").get_json() == {"status": "ready"}
    created(ask(client, QUESTION))


def test_a_database_migrated_by_a_newer_qna_is_503_saying_so(
    make_app: AppFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "qna.db")
    migrate_as_a_newer_qna(url)
    client = make_app(url).test_client()

    # /readyz said migrations_pending, as if the next start would migrate it.
    for response in (client.get("/readyz"), client.get("/questions"), ask(client, QUESTION)):
        error = assert_error(response, 503, "database_unavailable")
        assert "newer qna" in error["message"]
        assert "Retry-After" not in response.headers
    assert fake_openai.calls == 0


@pytest.mark.postgres
def test_a_readiness_probe_migrates_what_start_up_could_not(
    make_app: AppFactory, empty_postgres_url: str
) -> None:
    # As after a start with the database down: an orchestrator sends no request until
    # the server is ready, so the probe itself must bring the schema up.
    client = make_app(empty_postgres_url).test_client()

    response = client.get("/readyz")

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"status": "ready"}
    engine = create_engine(empty_postgres_url)
    try:
        assert migrate.is_at_head(engine)
    finally:
        engine.dispose()


def test_readiness_says_when_the_schema_falls_behind_after_start(
    client: FlaskClient, database_url: str
) -> None:
    assert client.get("/readyz").status_code == 200
    engine = create_engine(database_url)

    def record_version(revision: str) -> None:
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE alembic_version SET version_num = :revision"), {"revision": revision}
            )

    try:
        record_version("0003")  # a downgrade run by hand while it serves
        assert_error(client.get("/readyz"), 503, "migrations_pending")
    finally:
        record_version(migrate.HEAD_REVISION)  # the database is the other tests' too
        engine.dispose()


def test_metrics_count_asks(client: FlaskClient) -> None:
    created(ask(client, QUESTION))

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    metrics = response.get_data(as_text=True)
    assert re.search(r'^qna_asks_total\{outcome="answered"\} [1-9]', metrics, re.MULTILINE)
    assert "qna_llm_latency_seconds_bucket" in metrics
    assert 'qna_llm_tokens_total{kind="prompt"}' in metrics
    assert QUESTION not in metrics


def test_metrics_count_answers_cut_off_by_reason(
    client: FlaskClient, fake_openai: FakeOpenAI
) -> None:
    def cut_off(reason: str) -> float:
        metrics = client.get("/metrics").get_data(as_text=True)
        line = re.search(
            rf'^qna_answers_cut_off_total\{{reason="{reason}"\}} (\S+)$', metrics, re.M
        )
        return float(line.group(1)) if line else 0.0

    before = cut_off("length"), cut_off("content_filter")
    fake_openai.script(Reply(text="Paris is", finish_reason="length"))
    assert created(ask(client, QUESTION))["finish_reason"] == "length"
    created(ask(client, QUESTION))  # whole

    assert (cut_off("length"), cut_off("content_filter")) == (before[0] + 1, before[1])


def test_openapi_is_a_valid_openapi_3_1_document(client: FlaskClient) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    document = response.get_json()
    assert document["openapi"].startswith("3.1.")
    # Against the OpenAPI 3.1 meta-schema that schemathesis ships, then each component
    # schema against JSON Schema 2020-12 (the 3.1 meta-schema leaves them unchecked).
    schemathesis.openapi.from_dict(document).validate()
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


@pytest.mark.parametrize(
    ("mounted_at", "server"),
    [
        ("", "/"),
        ("/api", "/api"),
        ("/my%20api", "/my%20api"),
        ("/%C3%BC/a%7Bx%7D", "/%C3%BC/a%7Bx%7D"),
    ],
)
def test_openapi_names_where_the_api_is_mounted(
    client: FlaskClient, mounted_at: str, server: str
) -> None:
    # /docs "Try it out" sends to the document's server: under a prefix, with none
    # named, it called the paths at the root, outside the API.
    response = client.get("/openapi.json", base_url=f"http://localhost{mounted_at}/")

    assert response.get_json()["servers"] == [{"url": server}]
    assert client.get("/openapi.json").get_json()["servers"] == [{"url": "/"}]


def template(path: str) -> str:
    """A path with its parameters unnamed: Flask's `<qna_id>` and OpenAPI's `{id}` agree."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def test_openapi_lists_every_route(app: Flask) -> None:
    document = app.test_client().get("/openapi.json").get_json()
    # The description, not the API it describes.
    served_only = {"/openapi.json", "/docs", "/docs/", "/docs/swagger-ui/<version>/<name>"}

    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule in served_only:
            continue
        # HEAD is GET without the body; OPTIONS is an operation of its own (README).
        routes.setdefault(template(rule.rule), set()).update(rule.methods - {"HEAD"})

    documented = {
        template(path): {method.upper() for method in operations}
        for path, operations in document["paths"].items()
    }
    assert documented == routes


def test_openapi_says_options_needs_no_token_and_answers_204_with_allow(
    secured: FlaskClient,
) -> None:
    document = secured.get("/openapi.json").get_json()

    for path, operations in document["paths"].items():
        options = operations["options"]
        assert options["security"] == [], path
        assert set(options["responses"]) == {"204"}, path
        assert options["responses"]["204"]["headers"]["Allow"]["required"] is True, path
        assert "content" not in options["responses"]["204"], path


@pytest.mark.parametrize(("tokens", "limit"), [(None, ""), ("tok-a", ""), (None, "5/minute")])
def test_openapi_names_401_and_429_only_where_this_server_can_send_them(
    make_app: AppFactory, database_url: str, tokens: str | None, limit: str
) -> None:
    app = make_app(database_url, api_tokens=tokens, rate_limit=limit)
    document = app.test_client().get("/openapi.json").get_json()

    statuses = {
        (path, method): set(operation["responses"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    with_401 = {where for where, sent in statuses.items() if "401" in sent}
    with_429 = {where for where, sent in statuses.items() if "429" in sent}
    counted = {("/ask", "post"), ("/questions", "get"), ("/questions/{id}", "get")}
    assert with_401 == ({*counted, ("/metrics", "get")} if tokens else set())
    assert with_429 == ({*counted, ("/metrics", "get")} if limit else set())


def test_head_answers_as_get_does_without_a_body(client: FlaskClient) -> None:
    record = created(ask(client, QUESTION))
    document = client.get("/openapi.json").get_json()
    assert "answers HEAD" in document["info"]["description"]

    for path in ("/healthz", "/readyz", "/questions", f"/questions/{record['id']}", "/metrics"):
        got, head = client.get(path), client.head(path)
        assert (head.status_code, head.mimetype) == (got.status_code, got.mimetype), path
        assert head.data == b"", path
    assert client.head(f"/questions/{uuid4()}").status_code == 404


def test_openapi_states_this_servers_limits(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()

    assert str(MAX_BODY_BYTES) in document["info"]["description"]
    question = document["components"]["schemas"]["AskRequest"]["properties"]["question"]
    assert str(MAX_QUESTION_LENGTH) in question["description"]


# The error codes each route can answer with, by status (the rest of this file shows
# each one happening): the document must name them, and no other route's.
ROUTE_ERROR_CODES = {
    ("/ask", "post"): {
        "400": [
            "invalid_json",
            "invalid_request",
            "invalid_question",
            "invalid_argument",
            "bad_request",
        ],
        "502": ["llm_refused", "llm_bad_response"],
        "503": ["llm_unavailable", "llm_rate_limited", "database_unavailable", "misconfigured"],
        "504": ["llm_timeout"],
    },
    ("/questions", "get"): {
        "400": ["invalid_argument", "invalid_cursor"],
        "503": ["database_unavailable", "misconfigured"],
    },
    ("/questions/{id}", "get"): {
        "404": ["not_found"],
        "503": ["database_unavailable", "misconfigured"],
    },
    ("/readyz", "get"): {"503": ["database_unavailable", "migrations_pending", "misconfigured"]},
}


@pytest.mark.parametrize("route", ROUTE_ERROR_CODES, ids=" ".join)
def test_openapi_names_each_routes_error_codes(client: FlaskClient, route: tuple[str, str]) -> None:
    path, method = route
    responses = client.get("/openapi.json").get_json()["paths"][path][method]["responses"]

    for status, codes in ROUTE_ERROR_CODES[route].items():
        described = set(re.findall(r"`([a-z_]+)`", responses[status]["description"]))
        assert described == set(codes), (status, responses[status]["description"])


def test_openapi_names_a_code_for_every_error_response(secured: FlaskClient) -> None:
    document = secured.get("/openapi.json").get_json()

    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert re.search(r"`[a-z_]+`", response["description"]), (path, method, status)


def test_docs_is_an_html_page(client: FlaskClient) -> None:
    response = client.get("/docs")

    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert "openapi.json" in response.get_data(as_text=True)


class _PageParts(HTMLParser):
    """The URLs a page loads or links to, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self._in_inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [url for name in ("src", "href") if (url := found.get(name)) is not None]
        self._in_inline_script = tag == "script" and "src" not in found

    def handle_endtag(self, tag: str) -> None:
        self._in_inline_script = False

    def handle_data(self, data: str) -> None:
        if self._in_inline_script:
            self.inline_scripts.append(data)


def page_parts(response: TestResponse) -> _PageParts:
    parts = _PageParts()
    parts.feed(response.get_data(as_text=True))
    return parts


# Where the files of the page are, as the page names them relative to /docs.
DOCS_ASSETS = [f"/docs/swagger-ui/{swagger_ui.VERSION}/{name}" for name in swagger_ui.ASSET_TYPES]


@pytest.fixture
def docs_client(make_app: AppFactory) -> FlaskClient:
    """The docs need no database: an app whose database is down serves them."""
    return make_app(UNREACHABLE_DATABASE).test_client()


def test_docs_loads_nothing_from_another_host(docs_client: FlaskClient) -> None:
    # Offline, or in an air-gapped deployment, a page that loads its script from a CDN
    # is blank; behind a proxy that serves the API under a prefix, one that names its
    # files from the root ("/docs/...") misses them.
    response = docs_client.get("/docs")

    page = response.get_data(as_text=True)
    urls = page_parts(response).urls
    assert len(urls) >= 3, page
    for url in urls:
        assert not urlsplit(url).scheme and not url.startswith("/"), url
    assert "//" not in page  # no http://, https:// or scheme-relative URL, even in a script
    # Swagger UI's own default would load its validator badge from validator.swagger.io.
    assert "validatorUrl: null" in page


def test_every_file_the_docs_page_loads_is_served_as_what_it_is(docs_client: FlaskClient) -> None:
    urls = page_parts(docs_client.get("/docs")).urls
    # Resolved as a browser resolves them against the page's own URL.
    served = {url: docs_client.get(urljoin("/docs", url)) for url in urls}

    assert set(served) >= {path.removeprefix("/") for path in DOCS_ASSETS}
    types = {
        ".css": "text/css",
        ".js": "text/javascript",
        ".png": "image/png",
        ".json": "application/json",
    }
    for url, response in served.items():
        assert response.status_code == 200, url
        assert response.mimetype == types[Path(url).suffix], url
    bundle = next(r for url, r in served.items() if url.endswith("/swagger-ui-bundle.js"))
    stylesheet = next(r for url, r in served.items() if url.endswith("/swagger-ui.css"))
    icon = next(r for url, r in served.items() if url.endswith(".png"))
    assert b"SwaggerUIBundle" in bundle.get_data()
    assert b".swagger-ui" in stylesheet.get_data()
    assert icon.get_data().startswith(b"\x89PNG")


def test_the_docs_files_are_cached_for_as_long_as_their_url_names_their_version(
    docs_client: FlaskClient,
) -> None:
    [path, *_] = DOCS_ASSETS

    response = docs_client.get(path)

    assert response.cache_control.max_age is not None
    assert response.cache_control.max_age >= 30 * 24 * 3600
    assert response.cache_control.immutable
    # Never changing, a file is sent whole whatever is asked: werkzeug's conditional
    # answers were no JSON errors (a 412 with the file as its body, a 416).
    for condition in ({"If-Match": '"nope"'}, {"Range": "bytes=99999999-"}, {"Range": "bytes=0-9"}):
        again = docs_client.get(path, headers=condition)
        assert (again.status_code, again.get_data()) == (200, response.get_data()), condition
    # A page from before an upgrade names files that are gone.
    other_version = path.replace(f"/{swagger_ui.VERSION}/", "/0.0.1/")
    assert_error(docs_client.get(other_version), 404, "not_found")


def test_the_docs_page_runs_only_its_own_scripts(docs_client: FlaskClient) -> None:
    response = docs_client.get("/docs")

    policy = response.headers["Content-Security-Policy"]
    directives = dict(
        (name, " ".join(values))
        for name, *values in (part.split() for part in policy.split(";") if part.strip())
    )
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'self'"  # no other site may frame it
    assert "unsafe" not in policy
    assert "http" not in policy and "*" not in policy
    for script in page_parts(response).inline_scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in directives["script-src"].split(), script


ASSETS_ROOT = f"/docs/swagger-ui/{swagger_ui.VERSION}"


@pytest.mark.parametrize(
    "path",
    [
        f"{ASSETS_ROOT}/../flask_swagger_ui.py",
        f"{ASSETS_ROOT}/..%2fflask_swagger_ui.py",
        f"{ASSETS_ROOT}/%2e%2e%2fflask_swagger_ui.py",
        f"{ASSETS_ROOT}/%2E%2E%2Fflask_swagger_ui.py",
        f"{ASSETS_ROOT}/..%5cflask_swagger_ui.py",
        f"{ASSETS_ROOT}/%252e%252e%252fflask_swagger_ui.py",
        f"{ASSETS_ROOT}/..%c0%afflask_swagger_ui.py",
        f"{ASSETS_ROOT}/%2fetc%2fpasswd",
        f"{ASSETS_ROOT}//etc/passwd",
        f"{ASSETS_ROOT}/swagger-ui.css%00.py",
        f"{ASSETS_ROOT}/swagger-ui.css/",
        "/docs/swagger-ui/../swagger-ui.css",
        "/docs/swagger-ui/%2e%2e/swagger-ui.css",
        "/docs/swagger-ui/..%2f..%2f..%2fflask_swagger_ui/swagger-ui.css",
        # Files of the package that the page does not load.
        f"{ASSETS_ROOT}/LICENSE",
        f"{ASSETS_ROOT}/VERSION",
        f"{ASSETS_ROOT}/swagger-ui.js",
        f"{ASSETS_ROOT}/oauth2-redirect.html",
        f"{ASSETS_ROOT}/nope.js",
        f"{ASSETS_ROOT}/",
        "/docs/swagger-ui",
    ],
)
def test_nothing_else_is_served_under_docs(docs_client: FlaskClient, path: str) -> None:
    assert_error(docs_client.get(path), 404, "not_found")


# -- rejected asks: 400, 404, 405, 413, 415 ----------------------------------------------------

NESTED = b'{"question": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"

HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("malformed", b'{"question": ', "invalid_json"),
    ("single-quotes", b"{'question': 'x'}", "invalid_json"),
    ("trailing-garbage", b'{"question": "x"} trailing', "invalid_json"),
    ("empty", b"", "invalid_json"),
    ("whitespace", b"   ", "invalid_json"),
    ("nan", b'{"question": NaN}', "invalid_json"),
    # JSON has no NaN or Infinity; pydantic's parser took them, in an ignored field too.
    ("nan-ignored", b'{"question": "x", "extra": NaN}', "invalid_json"),
    ("infinity", b'{"question": "x", "extra": [1, -Infinity]}', "invalid_json"),
    # Too deep for the NaN check's parser too: pydantic's depth error, not a 500.
    ("nested-with-nan", b"[" * 3000 + b"NaN" + b"]" * 3000, "invalid_json"),
    (
        "nested-with-nan-in-text",
        b'{"question": "What is NaN?", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        "invalid_json",
    ),
    ("invalid-utf8", b'{"question": "\xff\xfe caf\xe9"}', "invalid_json"),
    ("overlong-utf8", b'{"question": "\xc0\xaf"}', "invalid_json"),
    ("encoded-surrogate", b'{"question": "\xed\xa0\x80"}', "invalid_json"),
    ("nested-10000", NESTED, "invalid_json"),
    ("nested-array-10000", b"[" * 10_000 + b"]" * 10_000, "invalid_json"),
    ("question-int", b'{"question": 1}', "invalid_request"),
    ("question-null", b'{"question": null}', "invalid_request"),
    ("question-list", b'{"question": []}', "invalid_request"),
    ("question-object", b'{"question": {}}', "invalid_request"),
    ("question-bool", b'{"question": true}', "invalid_request"),
    ("question-huge-number", b'{"question": 1e999999}', "invalid_request"),
    ("fresh-string", b'{"question": "x", "fresh": "yes"}', "invalid_request"),
    ("fresh-int", b'{"question": "x", "fresh": 1}', "invalid_request"),
    ("missing-question", b'{"fresh": true}', "invalid_request"),
    ("empty-object", b"{}", "invalid_request"),
    ("wrong-case-key", b'{"Question": "x"}', "invalid_request"),
    ("body-array", b'["What is the capital of France?"]', "invalid_request"),
    ("body-string", b'"What is the capital of France?"', "invalid_request"),
    ("body-number", b"42", "invalid_request"),
    ("body-null", b"null", "invalid_request"),
    ("blank", b'{"question": "   "}', "invalid_question"),
    ("empty-question", b'{"question": ""}', "invalid_question"),
    ("newlines-only", b'{"question": "\\r\\n\\n\\t"}', "invalid_question"),
    ("zero-width-only", b'{"question": "\\u200b\\ufeff"}', "invalid_question"),
    ("nul", b'{"question": "a\\u0000b"}', "invalid_question"),
    ("bell", b'{"question": "a\\u0007b"}', "invalid_question"),
    ("escape", b'{"question": "\\u001b[31mred"}', "invalid_question"),
    ("delete", b'{"question": "a\\u007fb"}', "invalid_question"),
    ("c1-control", b'{"question": "a\\u0085b"}', "invalid_question"),
    (
        "over-long",
        json.dumps({"question": "x" * (MAX_QUESTION_LENGTH + 1)}).encode(),
        "invalid_question",
    ),
]


@pytest.mark.parametrize(
    ("body", "code"),
    [pytest.param(body, code, id=name) for name, body, code in HOSTILE_BODIES],
)
def test_a_hostile_body_is_400_and_nothing_is_stored(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, body: bytes, code: str
) -> None:
    assert_error(post_raw(client, body), 400, code)

    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize(
    "escape",
    [rb"\ud800", rb"\udfff", rb"\ud800\u0041", rb"\udc00\ud800"],
    ids=["lone-high", "lone-low", "high-then-letter", "reversed-pair"],
)
def test_a_lone_surrogate_escape_is_400(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, escape: bytes
) -> None:
    response = post_raw(client, b'{"question": "a' + escape + b'b"}')

    # Refused by the JSON parser or by the question rules: either way, a 400.
    code = response.get_json()["error"]["code"]
    assert code in {"invalid_json", "invalid_question"}
    assert_error(response, 400, code)
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


def test_a_question_at_the_limit_is_accepted(client: FlaskClient) -> None:
    # Surrounding whitespace does not count towards the limit.
    question = "x" * MAX_QUESTION_LENGTH

    body = created(ask(client, f"  {question}\n\n"))

    assert body["question"] == question


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"question": "a", "question": "b"}', "question"),
        (b'{"question": "a", "question": "a"}', "question"),
        (b'{"question": "a", "\\u0071uestion": "b"}', "question"),
        (b'{"question": "a", "fresh": false, "fresh": true}', "fresh"),
        (b'{"question": "a", "extra": {"x": 1, "x": 2}}', "x"),
    ],
    ids=["question", "same-value", "escaped-spelling", "fresh", "nested-unknown"],
)
def test_a_key_given_twice_is_400_and_nothing_is_stored(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, body: bytes, key: str
) -> None:
    # Which one was meant cannot be known: the last one silently won, so a client (or a
    # proxy that appends a field) asked a question other than the one it checked.
    error = assert_error(post_raw(client, body), 400, "invalid_request")

    assert f'"{key}"' in error["message"]
    assert "twice" in error["message"]
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


def test_unknown_fields_are_ignored(client: FlaskClient) -> None:
    body = created(ask(client, QUESTION, extra={"nested": [1, 2]}, id="forged"))

    assert body["question"] == QUESTION
    assert body["id"] != "forged"


def test_a_json_suffix_media_type_is_accepted(client: FlaskClient) -> None:
    body = json.dumps({"question": QUESTION}).encode()

    created(post_raw(client, body, "application/vnd.qna+json; charset=utf-8"))


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/ask/",
        "/questions/",
        "/questions/a/b",
        "/%00",
        "/" + "a" * 5000,
        # Werkzeug merged these slashes with a 308 and an HTML page.
        "/questions//x",
        f"/questions//{uuid4()}",
        "/healthz//",
    ],
)
def test_an_unknown_route_is_404(client: FlaskClient, path: str) -> None:
    assert_error(client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/ask", {"POST", "OPTIONS"}),
        ("PUT", "/ask", {"POST", "OPTIONS"}),
        ("DELETE", "/questions", {"GET", "HEAD", "OPTIONS"}),
        ("POST", "/questions", {"GET", "HEAD", "OPTIONS"}),
        ("DELETE", f"/questions/{uuid4()}", {"GET", "HEAD", "OPTIONS"}),
        ("PATCH", "/healthz", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_a_wrong_method_is_405_with_allow(
    client: FlaskClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.open(path, method=method)

    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (417, "expectation_failed"),
        (431, "headers_too_large"),
        (418, "bad_request"),
        (505, "internal_error"),
    ],
)
def test_an_http_error_has_the_same_code_from_the_app_and_from_gunicorn(
    app: Flask, monkeypatch: pytest.MonkeyPatch, status: int, code: str
) -> None:
    # gunicorn answers what it cannot parse itself (server._json_error); the app
    # answers the rest. One status, one code, whichever of the two answers it.
    @app.route("/aborts")
    def aborts() -> None:
        abort(status)

    assert_error(app.test_client().get("/aborts"), status, code)

    written: list[bytes] = []
    monkeypatch.setattr(server.gunicorn_util, "write_nonblock", lambda _s, b: written.append(b))
    server._json_error(None, status, "Reason", "A message.")
    head, _, body = written[0].partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert json.loads(body) == {"error": {"code": code, "message": "A message."}}


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/ask", {"POST", "OPTIONS"}),
        ("/questions", {"GET", "HEAD", "OPTIONS"}),
        (f"/questions/{uuid4()}", {"GET", "HEAD", "OPTIONS"}),
        ("/healthz", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_options_is_204_with_allow_and_no_body(
    client: FlaskClient, fake_openai: FakeOpenAI, path: str, allowed: set[str]
) -> None:
    response = client.options(path)

    assert response.status_code == 204
    assert response.get_data() == b""
    assert "Content-Type" not in response.headers
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed
    assert fake_openai.calls == 0


def test_options_needs_no_database(make_app: AppFactory) -> None:
    client = make_app(UNREACHABLE_DATABASE).test_client()

    assert client.options("/ask").status_code == 204


def test_a_body_over_the_limit_is_413(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str
) -> None:
    body = json.dumps({"question": "x" * MAX_BODY_BYTES}).encode()

    assert_error(post_raw(client, body), 413, "payload_too_large")
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


def test_a_content_length_over_the_limit_is_413_whatever_the_body(client: FlaskClient) -> None:
    response = post_raw(
        client,
        b'{"question": "x"}',
        environ_overrides={"CONTENT_LENGTH": str(10**12)},
    )

    assert_error(response, 413, "payload_too_large")


def test_a_short_content_length_cuts_the_body_where_it_says(client: FlaskClient) -> None:
    response = post_raw(client, b'{"question": "x"}', environ_overrides={"CONTENT_LENGTH": "5"})

    assert_error(response, 400, "invalid_json")


# A server that ends streamed bodies itself (gunicorn, for chunked requests) says so
# with wsgi.input_terminated, and sends no Content-Length.
STREAMED = {"CONTENT_LENGTH": "", "wsgi.input_terminated": True}


def test_a_streamed_body_under_the_limit_is_read(client: FlaskClient) -> None:
    body = json.dumps({"question": QUESTION}).encode()

    assert created(post_raw(client, body, environ_overrides=STREAMED))["question"] == QUESTION


def test_a_streamed_body_over_the_limit_is_413(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str
) -> None:
    # The first MAX_BODY_BYTES bytes are a valid ask on their own.
    body = b'{"question": "x"}' + b" " * MAX_BODY_BYTES

    assert_error(post_raw(client, body, environ_overrides=STREAMED), 413, "payload_too_large")
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        None,
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/jsonx",
        "json",
    ],
)
def test_a_body_that_is_not_json_is_415(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, content_type: str | None
) -> None:
    body = json.dumps({"question": QUESTION}).encode()

    assert_error(post_raw(client, body, content_type), 415, "unsupported_media_type")
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize(
    ("charset", "encoding"),
    [
        ("utf-16", "utf-16"),
        ("UTF-16LE", "utf-16-le"),
        ("utf-32", "utf-32"),
        ("iso-8859-1", "latin-1"),
        ("latin-1", "ascii"),  # refused even when the bytes happen to be the same
        ("klingon", "ascii"),
    ],
)
def test_a_body_in_a_charset_other_than_utf8_is_415(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, charset: str, encoding: str
) -> None:
    body = json.dumps({"question": "Où est Zürich ?"}, ensure_ascii=encoding == "ascii")

    response = post_raw(client, body.encode(encoding), f"application/json; charset={charset}")

    assert charset in assert_error(response, 415, "unsupported_media_type")["message"]
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize(
    "content_type",
    [
        # A charset werkzeug cannot read it leaves out, and the body was taken.
        "application/json; charset=",
        "application/json; charset=\u00e9",
        # A +json suffix with no name before it.
        "foo/+json",
        "application/+json",
    ],
)
def test_a_media_type_that_only_looks_like_json_is_415(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, content_type: str
) -> None:
    body = json.dumps({"question": QUESTION}).encode()

    assert_error(post_raw(client, body, content_type), 415, "unsupported_media_type")
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", "utf8", '"utf-8"'])
def test_a_body_declared_utf8_is_read(client: FlaskClient, charset: str) -> None:
    body = json.dumps({"question": "Où est Zürich ?"}, ensure_ascii=False).encode()

    asked = created(post_raw(client, body, f"application/json; charset={charset}"))

    assert asked["question"] == "Où est Zürich ?"


def test_form_data_is_415(client: FlaskClient) -> None:
    response = client.post("/ask", data={"question": QUESTION})

    assert_error(response, 415, "unsupported_media_type")


def encoded_json(encoding: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Content-Encoding": encoding}


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "gzip, identity"])
def test_a_compressed_body_is_415_not_read_as_plain_json(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, encoding: str
) -> None:
    # Even a body that happens to be plain JSON: the client said it was not.
    body = json.dumps({"question": QUESTION}).encode()
    compressed = gzip.compress(body)

    for data in (compressed, body):
        response = client.post("/ask", data=data, headers=encoded_json(encoding))
        error = assert_error(response, 415, "unsupported_media_type")
        assert "Content-Encoding" in error["message"]
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "x-foo, chunked"])
def test_a_transfer_coding_other_than_chunked_is_400_not_read_as_plain_json(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, coding: str
) -> None:
    # gunicorn takes the chunked framing off and hands over what is under it, still
    # gzipped: a plain body so labelled was asked, a gzipped one was invalid_json.
    body = json.dumps({"question": QUESTION}).encode()
    headers = {"Content-Type": "application/json", "Transfer-Encoding": coding}

    response = client.post("/ask", data=body, headers=headers, environ_overrides=STREAMED)

    error = assert_error(response, 400, "bad_request")

    assert "Transfer-Encoding" in error["message"]
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize("coding", ["chunked", "Chunked"])
def test_a_chunked_body_is_read(client: FlaskClient, coding: str) -> None:
    body = json.dumps({"question": QUESTION}).encode()
    headers = {"Content-Type": "application/json", "Transfer-Encoding": coding}

    created(client.post("/ask", data=body, headers=headers, environ_overrides=STREAMED))


@pytest.mark.parametrize("encoding", ["identity", "Identity", ""])
def test_an_identity_encoded_body_is_read(client: FlaskClient, encoding: str) -> None:
    body = json.dumps({"question": QUESTION}).encode()

    created(client.post("/ask", data=body, headers=encoded_json(encoding)))


# -- the LLM fails -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "status", "code"),
    [
        (Status(500), 503, "llm_unavailable"),
        (Status(503), 503, "llm_unavailable"),
        (Status(502), 503, "llm_unavailable"),
        (Status(429), 503, "llm_rate_limited"),
        (Delay(5.0), 504, "llm_timeout"),
        (Status(408), 504, "llm_timeout"),
        (Status(401), 502, "llm_refused"),
        (Status(404), 502, "llm_refused"),
        (Raw(body=b"not json"), 502, "llm_bad_response"),
        (Raw(body=b'{"choices": []}'), 502, "llm_bad_response"),
        (Raw(body=b"<html>oops</html>", content_type="text/html"), 502, "llm_bad_response"),
    ],
    ids=[
        "500",
        "503",
        "502",
        "429",
        "timeout",
        "408",
        "401",
        "404",
        "not-json",
        "no-choices",
        "html",
    ],
)
def test_an_llm_failure_is_mapped_and_stored_as_failed(
    client: FlaskClient,
    fake_openai: FakeOpenAI,
    database_url: str,
    step: Any,
    status: int,
    code: str,
) -> None:
    fake_openai.script(step)

    response = ask(client, QUESTION)

    error = assert_error(response, status, code)
    if status == 503:
        assert int(response.headers["Retry-After"]) >= 1
    qna_id = UUID(error["qna_id"])
    record = client.get(f"/questions/{qna_id}").get_json()
    assert record["status"] == "failed"
    assert record["answer"] is None
    assert record["error"]["code"] == code
    assert record["question"] == QUESTION
    [row] = stored_rows(database_url)
    assert UUID(str(row["id"])) == qna_id
    assert (row["status"], row["error_kind"]) == ("failed", code)


def test_an_llm_failure_the_database_would_not_store_says_both(
    make_app: AppFactory, fake_openai: FakeOpenAI, outcomes_refused: str
) -> None:
    # The LLM failed, then storing that failed too: the LLM's failure is why there is
    # no answer, and what a client acts on (as `qna ask` exits with its code); the
    # database's is said too, or the message would not explain the pending record.
    fake_openai.script(Status(429, headers={"Retry-After": "7"}))
    app = make_app(outcomes_refused)
    client = app.test_client()

    response = ask(client, QUESTION)

    error = assert_error(response, 503, "llm_rate_limited", record=True)
    assert response.headers["Retry-After"] == "7"
    assert "No space left on device" in error["message"]
    [row] = stored_rows(outcomes_refused)
    assert row["status"] == "pending"  # until it is closed as abandoned
    assert str(row["id"]) in error["message"]
    assert "qna_id" not in error  # the record does not say what the error says
    # The failed record the database would not take, as GET /questions/<id> shows one.
    record = response.get_json()["record"]
    assert record["id"] == str(row["id"])
    assert (record["status"], record["answer"]) == ("failed", None)
    assert record["error"]["code"] == "llm_rate_limited"
    assert_documented_error_body(app, response)


def test_an_answer_the_database_would_not_store_reaches_the_asker(
    make_app: AppFactory, fake_openai: FakeOpenAI, outcomes_refused: str
) -> None:
    # The LLM answered, and was paid for: the answer travels with the 503, as `qna ask`
    # prints it and `client.ask` raises it on OutcomeNotStored.qna.
    app = make_app(outcomes_refused)
    client = app.test_client()

    response = ask(client, QUESTION)

    error = assert_error(response, 503, "database_unavailable", record=True)
    assert response.headers["Retry-After"] == "5"
    assert "No space left on device" in error["message"]
    assert "qna_id" not in error
    [row] = stored_rows(outcomes_refused)
    assert row["status"] == "pending"  # until it is closed as abandoned
    record = response.get_json()["record"]
    assert record["id"] == str(row["id"])
    assert (record["status"], record["answer"]) == ("answered", DEFAULT_ANSWER)
    assert record["question"] == QUESTION
    # The shape of every other record: no field left out, nulls kept.
    assert set(record) == set(QnAOut.model_fields)
    assert (record["error"], record["source_id"]) == (None, None)
    assert fake_openai.calls == 1
    assert_documented_error_body(app, response)


def test_the_llm_secret_is_not_in_the_error(client: FlaskClient, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Status(401, body={"error": {"message": "Incorrect API key: sk-test"}}))

    response = ask(client, QUESTION)

    assert_error(response, 502, "llm_refused")
    assert "sk-test" not in response.get_data(as_text=True)


def test_the_providers_retry_after_is_passed_on(
    client: FlaskClient, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Status(429, headers={"Retry-After": "7"}))

    response = ask(client, QUESTION)

    assert_error(response, 503, "llm_rate_limited")
    assert response.headers["Retry-After"] == "7"


@pytest.mark.parametrize(
    ("header", "value", "retry_after"),
    [
        ("retry-after-ms", "2500", "3"),
        ("retry-after-ms", "1400", "2"),
        ("retry-after-ms", "200", "1"),
        ("Retry-After", "0", "1"),
    ],
)
def test_the_providers_wait_is_rounded_up_never_down(
    client: FlaskClient, fake_openai: FakeOpenAI, header: str, value: str, retry_after: str
) -> None:
    # Retry-After counts whole seconds: a client sent back after 2 s of a 2.5 s wait is
    # refused again, and a wait of 0 sends it back at once.
    fake_openai.script(Status(429, headers={header: value}))

    response = ask(client, QUESTION)

    assert_error(response, 503, "llm_rate_limited")
    assert response.headers["Retry-After"] == retry_after


def test_a_dropped_connection_is_503(client: FlaskClient, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Drop())

    assert_error(ask(client, QUESTION), 503, "llm_unavailable")


def test_failures_are_listed_in_the_history(client: FlaskClient, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Status(503))
    failed = assert_error(ask(client, "first"), 503, "llm_unavailable")
    answered = created(ask(client, "second"))

    items = client.get("/questions").get_json()["items"]

    assert [(item["id"], item["status"]) for item in items] == [
        (answered["id"], "answered"),
        (failed["qna_id"], "failed"),
    ]


def test_the_history_of_one_status(client: FlaskClient, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Status(503), Status(503))
    failed = [assert_error(ask(client, f"q{n}"), 503, "llm_unavailable")["qna_id"] for n in (0, 1)]
    answered = created(ask(client, "second"))

    first = client.get("/questions?status=failed&limit=1").get_json()
    rest = client.get(f"/questions?status=failed&limit=1&cursor={first['next']}").get_json()
    only_answered = client.get("/questions?status=answered").get_json()

    assert [item["id"] for item in first["items"] + rest["items"]] == failed[::-1]
    assert rest["next"] is None
    assert [item["id"] for item in only_answered["items"]] == [answered["id"]]
    assert client.get("/questions?status=pending").get_json() == {"items": [], "next": None}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=done", "status must be one of pending, answered, failed."),
        ("status=", "status must be one of pending, answered, failed."),
        ("status=Failed", "status must be one of pending, answered, failed."),
        ("status=failed&status=answered", "Give status at most once."),
    ],
)
def test_a_history_status_that_is_not_one_is_400(
    client: FlaskClient, query: str, message: str
) -> None:
    error = assert_error(client.get(f"/questions?{query}"), 400, "invalid_argument")

    assert error["message"] == message


def test_metrics_count_failures(client: FlaskClient, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Status(429))
    ask(client, QUESTION)

    metrics = client.get("/metrics").get_data(as_text=True)

    assert re.search(r'^qna_asks_total\{outcome="llm_rate_limited"\} [1-9]', metrics, re.M)


# -- text round-trips ----------------------------------------------------------------------------

ROUND_TRIP = [
    "Was ist 1 + 1? 🤔🇫🇷👩‍👩‍👧",
    "ما هي عاصمة فرنسا؟",
    "שָׁלוֹם עולם",
    "e\u0301 a\u0308 n\u0303 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "'; DROP TABLE qn_a; --",
    "Robert'); DELETE FROM qn_a WHERE ('1'='1",
    '{"question": "nested"} \\ \\\\ \\u0000',
    "<script>alert(1)</script> &amp; %s %d {0} ${x}",
    "tab\there\nnew line",
    "𝕳𝖊𝖑𝖑𝖔 \U0010fffd \ue000 \ufffd",  # noqa: RUF001 (look-alikes on purpose)
    "日本語の質問ですか？",  # noqa: RUF001
    "\u202eRTL override\u202c and \u200dZWJ",
]


@pytest.mark.parametrize("question", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_unicode_round_trips_exactly(
    client: FlaskClient, fake_openai: FakeOpenAI, question: str
) -> None:
    body = created(ask(client, question))

    fetched = client.get(f"/questions/{body['id']}")

    assert body["question"] == question
    assert fetched.get_json()["question"] == question
    # Raw UTF-8 on the wire, not escapes, and the same text reached the LLM.
    assert json.dumps(question, ensure_ascii=False).encode() in fetched.get_data()
    assert fake_openai.requests[-1]["messages"][-1]["content"] == question


def test_line_endings_and_surrounding_space_are_normalised(client: FlaskClient) -> None:
    body = created(ask(client, "  \r\n line one\r\nline two\rline three \n\t "))

    assert body["question"] == "line one\nline two\nline three"


# -- properties ----------------------------------------------------------------------------------


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(question=st.text(max_size=60) | st.text(alphabet="ab \r\n\t\x00\u200b", max_size=12))
def test_a_question_is_stored_as_the_parse_rules_say(client: FlaskClient, question: str) -> None:
    response = ask(client, question)

    expected = question.replace("\r\n", "\n").replace("\r", "\n").strip()
    plain = expected.replace("\n", "").replace("\t", "")
    if response.status_code == 201:
        body = response.get_json()
        assert body["question"] == expected
        assert client.get(f"/questions/{body['id']}").get_json()["question"] == expected
        assert not any(unicodedata.category(c) in {"Cc", "Cs"} for c in plain)
    else:
        assert_error(response, 400, "invalid_question")
        # Printable text with a letter or digit in it is always a question.
        assert not (plain.isprintable() and any(c.isalnum() for c in plain))


# -- tokens, rate limits, idempotency ------------------------------------------------------------

TOKENS = "tok-a, tok-b"
BEARER_A = {"Authorization": "Bearer tok-a"}


@pytest.fixture
def secured(make_app: AppFactory, database_url: str) -> FlaskClient:
    return make_app(database_url, api_tokens=TOKENS).test_client()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer tok-c", "Bearer tok-a,tok-b", "Basic tok-a", "tok-a"],
)
def test_without_a_valid_token_the_api_is_401(
    secured: FlaskClient, fake_openai: FakeOpenAI, database_url: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}

    for response in (
        secured.post("/ask", json={"question": QUESTION}, headers=headers),
        secured.get("/questions", headers=headers),
        secured.get(f"/questions/{uuid4()}", headers=headers),
        secured.get("/metrics", headers=headers),
    ):
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize("authorization", ["Bearer tok-c", "Bearer tok-a,tok-b", "bearer  tok-c"])
def test_a_wrong_token_is_told_invalid_token(secured: FlaskClient, authorization: str) -> None:
    response = secured.get("/questions", headers={"Authorization": authorization})

    assert_error(response, 401, "unauthorized")
    # RFC 6750, section 3.1: a token that was sent but is not valid is "invalid_token",
    # so that a client knows to get another one rather than to send one at all.
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="qna", error="invalid_token"'


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer ", "Basic tok-a", "tok-a"])
def test_a_missing_token_is_told_the_bare_challenge(
    secured: FlaskClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}

    response = secured.get("/questions", headers=headers)

    assert_error(response, 401, "unauthorized")
    # RFC 6750, section 3.1: no error code for a request with no bearer token in it.
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="qna"'


@pytest.mark.parametrize("tokens", [",", " , ,", ",,,"])
def test_tokens_that_list_no_token_are_refused_not_an_open_api(
    make_app: AppFactory, database_url: str, tokens: str
) -> None:
    # The operator meant to close the API; a typo must not leave it open.
    with pytest.raises(ConfigurationError, match="lists no token"):
        make_app(database_url, api_tokens=tokens)


@pytest.mark.parametrize("tokens", ["pässwort", "tok-a,tökén", "tok\x00a"])
def test_a_token_beyond_printable_ascii_is_refused(
    make_app: AppFactory, database_url: str, tokens: str
) -> None:
    # A header's bytes are read as Latin-1: a client sending such a token in UTF-8 was
    # turned away with 401 on every request, and nothing said why.
    with pytest.raises(ConfigurationError, match="printable ASCII"):
        make_app(database_url, api_tokens=tokens)


@pytest.mark.parametrize("token", ["tok-a", "tok-b"])
def test_any_configured_token_is_let_in(secured: FlaskClient, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}

    body = created(secured.post("/ask", json={"question": QUESTION}, headers=headers))

    assert secured.get(f"/questions/{body['id']}", headers=headers).status_code == 200
    assert secured.get("/metrics", headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs", *DOCS_ASSETS])
def test_probes_and_docs_need_no_token(secured: FlaskClient, path: str) -> None:
    assert secured.get(path).status_code == 200


def test_docs_with_a_trailing_slash_is_sent_to_the_page(
    make_app: AppFactory, database_url: str
) -> None:
    # Without a token or rate budget, as the page itself; and under a prefix, to it.
    app = make_app(database_url, api_tokens="tok-a", rate_limit="1/minute")
    client = app.test_client()

    for _ in range(2):
        response = client.get("/docs/")
        assert response.status_code == 308
        assert urljoin("/docs/", response.headers["Location"]) == "/docs"
    # Under a prefix a proxy strips, too: relative, it stays there.
    assert urljoin("/api/docs/", response.headers["Location"]) == "/api/docs"
    assert client.get("/docs", follow_redirects=True).status_code == 200


def test_a_file_the_docs_do_not_have_is_404_without_a_token(secured: FlaskClient) -> None:
    assert_error(secured.get(f"{ASSETS_ROOT}/nope.js"), 404, "not_found")


def test_the_secured_openapi_document_says_bearer(secured: FlaskClient) -> None:
    document = secured.get("/openapi.json").get_json()

    schemathesis.openapi.from_dict(document).validate()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/ask"]["post"]["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_over_the_rate_limit_is_429_with_retry_after(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    client = make_app(database_url, rate_limit="2/minute").test_client()
    for _ in range(2):
        response = ask(client, QUESTION)
        assert response.status_code == 201
        assert "Retry-After" not in response.headers

    refused = ask(client, QUESTION)

    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(stored_rows(database_url)) == 2
    assert fake_openai.calls == 2
    # Orchestrators' probes are never limited.
    for _ in range(5):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("proxies", [0, 1])
def test_behind_trusted_proxies_each_client_has_its_own_rate_budget(
    make_app: AppFactory, database_url: str, proxies: int
) -> None:
    # Behind nginx every client was the proxy's address: one used up all's budget.
    client = make_app(database_url, rate_limit="2/minute", trusted_proxies=proxies).test_client()

    def seen_from(address: str) -> int:
        # As one nginx appends it; a client's own header before it is not believed.
        forwarded = {"X-Forwarded-For": f"6.6.6.6, {address}"}
        return client.get("/questions", headers=forwarded).status_code

    first = [seen_from("10.0.0.1") for _ in range(3)]
    other = seen_from("10.0.0.2")

    assert first == [200, 200, 429]
    # Without trusted proxies the header is anyone's to write, and not read.
    assert other == (200 if proxies else 429)


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", *DOCS_ASSETS])
def test_the_description_of_the_api_spends_no_rate_budget(
    make_app: AppFactory, database_url: str, path: str
) -> None:
    # A client (or a browser on /docs, which fetches its files and /openapi.json too)
    # reading how to call the API must not use up what it may call it with.
    for tokens, headers in ((None, {}), (TOKENS, BEARER_A)):
        client = make_app(database_url, api_tokens=tokens, rate_limit="2/minute").test_client()
        for _ in range(3):
            response = client.get(path, headers=headers)
            assert response.status_code == 200
            assert "X-RateLimit-Remaining" not in response.headers

        created(ask(client, QUESTION, headers=headers))
        created(ask(client, QUESTION, headers=headers))
        assert_error(ask(client, QUESTION, headers=headers), 429, "rate_limited")


def test_a_wrong_method_on_an_uncounted_route_spends_no_rate_budget(
    make_app: AppFactory, database_url: str
) -> None:
    client = make_app(database_url, rate_limit="2/minute").test_client()
    for _ in range(3):
        assert_error(client.post("/healthz"), 405, "method_not_allowed")
        assert_error(client.put("/openapi.json"), 405, "method_not_allowed")

    created(ask(client, QUESTION))
    created(ask(client, QUESTION))
    assert_error(ask(client, QUESTION), 429, "rate_limited")
    # A wrong method on a counted route is limited, as any other request there.
    assert_error(client.delete("/ask"), 429, "rate_limited")


def test_a_429s_retry_after_is_at_least_the_wait(make_app: AppFactory) -> None:
    # No database needed: /metrics is counted against the budget and reads none.
    client = make_app(UNREACHABLE_DATABASE, rate_limit="1/second").test_client()
    # The window opens half-way through a second and is hit again just after the next
    # second begins, 0.3 s before it closes: the limiter's whole-second arithmetic
    # said "Retry-After: 0" there, and a client honouring it was refused at once.
    time.sleep(1.5 - time.time() % 1)
    assert client.get("/metrics").status_code == 200
    time.sleep(1.15 - time.time() % 1)

    refused = client.get("/metrics")

    assert_error(refused, 429, "rate_limited")
    wait = int(refused.headers["Retry-After"])
    assert wait >= 1
    time.sleep(wait)
    assert client.get("/metrics").status_code == 200


def test_a_rate_limit_leaves_the_retry_after_of_a_503_alone(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    # The limiter sets Retry-After to its own window's reset on every response it
    # counts; on a 503 that is not the wait the error calls for.
    limited = {"rate_limit": "100/minute"}
    client = make_app(database_url, **limited).test_client()
    fake_openai.script(Status(429, headers={"Retry-After": "7"}))
    response = ask(client, QUESTION)
    assert_error(response, 503, "llm_rate_limited")
    assert response.headers["Retry-After"] == "7"

    down = make_app(UNREACHABLE_DATABASE, **limited).test_client()
    response = down.get("/questions")
    assert_error(response, 503, "database_unavailable")
    assert response.headers["Retry-After"] == "5"

    broken = make_app(broken_sqlite_file(tmp_path / "qna.db", "corrupt"), **limited)
    response = broken.test_client().get("/questions")
    assert_error(response, 503, "database_unavailable")
    assert "Retry-After" not in response.headers


def test_rate_limits_are_per_token(make_app: AppFactory, database_url: str) -> None:
    client = make_app(database_url, api_tokens=TOKENS, rate_limit="1/minute").test_client()

    assert client.get("/questions", headers=BEARER_A).status_code == 200
    assert_error(client.get("/questions", headers=BEARER_A), 429, "rate_limited")
    assert client.get("/questions", headers={"Authorization": "Bearer tok-b"}).status_code == 200


@pytest.mark.parametrize("rate_limit", ["", "5/minute"])
def test_the_document_names_the_rate_limit_headers_where_they_are_sent(
    make_app: AppFactory, database_url: str, rate_limit: str
) -> None:
    # What each documented operation really sends, against what the document says.
    client = make_app(database_url, rate_limit=rate_limit).test_client()
    paths = client.get("/openapi.json").get_json()["paths"]
    limit_headers = {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}

    counted_somewhere = False
    for path, operations in paths.items():
        for method, operation in operations.items():
            sent = client.open(path.replace("{id}", str(uuid4())), method=method.upper())
            sends_them = limit_headers <= set(sent.headers.keys())
            assert sends_them or not limit_headers & set(sent.headers.keys()), (path, method)
            counted_somewhere |= sends_them
            for status, response in operation["responses"].items():
                documented = set(response.get("headers", {}))
                assert "X-Request-ID" in documented, (path, method, status)
                assert (limit_headers <= documented) == sends_them, (path, method, status)
    assert counted_somewhere == bool(rate_limit)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/questions"),
        # No route (404) or not this route's method (405): the limiter passed over
        # them, so a token could be guessed there without limit (a valid one gets the
        # 404 or 405, a wrong one the 401).
        ("GET", "/nope"),
        ("DELETE", "/questions"),
    ],
)
def test_requests_refused_for_their_token_spend_their_address_budget(
    make_app: AppFactory, database_url: str, method: str, path: str
) -> None:
    # Refused before the limiter counted them, they were never limited: a client could
    # guess tokens as fast as it could send them.
    client = make_app(database_url, api_tokens=TOKENS, rate_limit="2/minute").test_client()
    wrong = {"Authorization": "Bearer tok-c"}

    assert_error(client.open(path, method=method, headers=wrong), 401, "unauthorized")
    assert_error(client.open(path, method=method), 401, "unauthorized")
    assert_error(client.open(path, method=method, headers=wrong), 429, "rate_limited")
    assert_error(client.open(path, method=method), 429, "rate_limited")
    # A valid token has a budget of its own, untouched by its address's.
    assert client.get("/questions", headers=BEARER_A).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        # A public route's wrong method is a 405 for anyone (Flask leaves the endpoint
        # empty then, and the token check took it for a route that needs one: 401).
        ("POST", "/healthz", 405),
        ("DELETE", "/openapi.json", 405),
        ("PUT", "/docs", 405),
        # A route that needs a token still needs one to learn its methods.
        ("DELETE", "/questions", 401),
    ],
)
def test_a_public_routes_wrong_method_is_405_without_a_token(
    secured: FlaskClient, method: str, path: str, status: int
) -> None:
    response = secured.open(path, method=method)

    assert_error(response, status, {405: "method_not_allowed", 401: "unauthorized"}[status])


def test_a_refusal_a_429_held_back_does_not_outlive_its_request(
    make_app: AppFactory, database_url: str
) -> None:
    # Requests that share an app context share `g`: a 401 the limiter's 429 kept from
    # being raised was raised for the next request instead, a valid token's too.
    app = make_app(database_url, api_tokens=TOKENS, rate_limit="1/minute")
    client = app.test_client()
    wrong = {"Authorization": "Bearer tok-c"}
    with app.app_context():
        assert_error(client.get("/questions", headers=wrong), 401, "unauthorized")
        assert_error(client.get("/questions", headers=wrong), 429, "rate_limited")

        assert client.get("/healthz").status_code == 200
        assert client.get("/questions", headers=BEARER_A).status_code == 200


# A browser's CORS preflight never carries Authorization, and precedes every request it
# makes: it must be answered without a token and must not spend the caller's budget.
PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/ask", {"POST", "OPTIONS"}),
        ("/questions", {"GET", "HEAD", "OPTIONS"}),
        (f"/questions/{uuid4()}", {"GET", "HEAD", "OPTIONS"}),
        ("/metrics", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_options_needs_no_token_and_spends_no_rate_budget(
    make_app: AppFactory, database_url: str, path: str, allowed: set[str]
) -> None:
    client = make_app(database_url, api_tokens=TOKENS, rate_limit="1/minute").test_client()

    for _ in range(3):
        response = client.options(path, headers=PREFLIGHT)
        assert response.status_code == 204, response.get_data(as_text=True)
        assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed
        assert response.get_data() == b""
    assert client.get("/questions", headers=BEARER_A).status_code == 200


def test_options_on_an_unknown_route_is_404(secured: FlaskClient) -> None:
    assert_error(secured.options("/nope", headers=PREFLIGHT), 404, "not_found")


def test_a_retry_with_the_same_key_returns_the_same_record(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str
) -> None:
    headers = {"Idempotency-Key": "order-42"}

    first = created(ask(client, QUESTION, headers=headers))
    again = created(ask(client, QUESTION, headers=headers))

    assert again == first
    assert fake_openai.calls == 1
    assert len(stored_rows(database_url)) == 1


def _answered_count(client: FlaskClient) -> float:
    metrics = client.get("/metrics").get_data(as_text=True)
    found = re.search(r'^qna_asks_total\{outcome="answered"\} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_replay_is_not_counted_again_in_the_metrics(
    client: FlaskClient, fake_openai: FakeOpenAI
) -> None:
    headers = {"Idempotency-Key": "count-me-once"}
    before = _answered_count(client)

    first = created(ask(client, QUESTION, headers=headers))
    after_first = _answered_count(client)
    again = created(ask(client, QUESTION, headers=headers))

    assert again == first
    assert after_first == before + 1
    assert _answered_count(client) == after_first
    assert fake_openai.calls == 1


def test_the_same_key_with_another_body_is_422(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    created(ask(client, QUESTION, headers=headers))

    assert_error(ask(client, "Another question?", headers=headers), 422, "idempotency_key_reused")
    assert fake_openai.calls == 1
    assert len(stored_rows(database_url)) == 1


def test_a_key_in_flight_is_409(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    app = make_app(database_url, idempotency_wait_s=0)
    headers = {"Idempotency-Key": "order-42"}
    fake_openai.script(Delay(0.8))
    first: list[TestResponse] = []
    asker = threading.Thread(
        target=lambda: first.append(ask(app.test_client(), QUESTION, headers=headers))
    )
    asker.start()
    try:
        give_up_at = time.monotonic() + 5
        while fake_openai.calls == 0 and time.monotonic() < give_up_at:
            time.sleep(0.01)

        retry = ask(app.test_client(), QUESTION, headers=headers)
    finally:
        asker.join(timeout=10)

    assert_error(retry, 409, "idempotency_key_in_flight")
    # When the first request's ask is over at the latest (llm_deadline_s is 10 here):
    # a client is told when to come back, not left to guess or to hammer.
    assert 1 <= int(retry.headers["Retry-After"]) <= 10
    created(first[0])
    assert fake_openai.calls == 1


def test_a_key_whose_ask_failed_asks_again(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    fake_openai.script(Status(401))
    failed = assert_error(ask(client, QUESTION, headers=headers), 502, "llm_refused")

    retried = created(ask(client, QUESTION, headers=headers))

    assert retried["id"] != failed["qna_id"]
    assert fake_openai.calls == 2
    assert sorted(row["status"] for row in stored_rows(database_url)) == ["answered", "failed"]


# "k1,k2" is also what a WSGI server hands over for two Idempotency-Key lines (RFC 9110
# joins repeated fields with commas): one key made of two, which neither retry matches.
@pytest.mark.parametrize("key", ["", "a b", "a" * 201, "ключ", "tab\tkey", "k1,k2", ","])
def test_a_malformed_key_is_400(
    client: FlaskClient, fake_openai: FakeOpenAI, database_url: str, key: str
) -> None:
    response = ask(client, QUESTION, headers={"Idempotency-Key": key})

    assert_error(response, 400, "invalid_argument")
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0
