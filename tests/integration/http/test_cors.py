"""Cross-origin calls from a browser (QNA_CORS_ORIGINS), through Flask's test client."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Response
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from qna.config import ConfigurationError
from qna.entrypoints.http import swagger_ui
from tests.integration.conftest import AppFactory
from tests.support.databases import broken_sqlite_file
from tests.support.fake_openai import FakeOpenAI, Status

APP = "https://app.example.com"
OTHER = "https://other.example.org"
QUESTION = "What is the capital of France?"
UNREACHABLE_DATABASE = "postgresql://u:p@127.0.0.1:1/x"
REQUESTED_HEADERS = "authorization, content-type, idempotency-key"


def preflight(client: FlaskClient, origin: str, path: str = "/ask") -> TestResponse:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": REQUESTED_HEADERS,
        },
    )


def ask(
    client: FlaskClient, origin: str, question: object = QUESTION, **headers: str
) -> TestResponse:
    return client.post("/ask", json={"question": question}, headers={"Origin": origin, **headers})


def cors_headers(response: TestResponse) -> dict[str, str]:
    return {
        name: value
        for name, value in response.headers.items()
        if name.lower().startswith("access-control-")
    }


def names(value: str) -> set[str]:
    return {name.strip().lower() for name in value.split(",") if name.strip()}


def vary(response: TestResponse) -> list[str]:
    """What Vary names, over all its header lines, as sent (duplicates kept)."""
    lines = response.headers.getlist("Vary")
    return [name.strip().lower() for line in lines for name in line.split(",") if name.strip()]


def test_without_the_setting_no_response_has_cors_headers(
    make_app: AppFactory, database_url: str
) -> None:
    client = make_app(database_url).test_client()

    for response in (
        preflight(client, APP),
        ask(client, APP),
        ask(client, APP, question=""),
        client.get("/questions", headers={"Origin": APP}),
    ):
        assert cors_headers(response) == {}, response.headers


def test_a_preflight_from_an_allowed_origin_is_allowed_without_token_or_budget(
    make_app: AppFactory, database_url: str
) -> None:
    client = make_app(
        database_url, cors_origins=f"{APP}, {OTHER}", api_tokens="tok", rate_limit="1/minute"
    ).test_client()

    for origin in (APP, OTHER, APP):
        response = preflight(client, origin)

        assert response.status_code == 204, response.get_data(as_text=True)
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "post" in names(response.headers["Access-Control-Allow-Methods"])
        assert names(response.headers["Access-Control-Allow-Headers"]) == names(REQUESTED_HEADERS)
        assert int(response.headers["Access-Control-Max-Age"]) > 0
        assert "origin" in names(response.headers.get("Vary", ""))
        assert "Access-Control-Allow-Credentials" not in response.headers
    # The budget of one request is still there.
    assert client.get("/questions", headers={"Authorization": "Bearer tok"}).status_code == 200


def test_a_preflight_asking_for_a_header_the_api_does_not_read_does_not_get_it(
    make_app: AppFactory, database_url: str
) -> None:
    client = make_app(database_url, cors_origins=APP).test_client()

    response = client.options(
        "/ask",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-custom",
        },
    )

    assert names(response.headers["Access-Control-Allow-Headers"]) == {"content-type"}


def test_an_answer_to_an_allowed_origin_can_be_read_with_its_headers(
    make_app: AppFactory, database_url: str
) -> None:
    client = make_app(database_url, cors_origins=APP).test_client()

    response = ask(client, APP)

    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "origin" in names(response.headers["Vary"])
    exposed = names(response.headers["Access-Control-Expose-Headers"])
    # What the API documents for a client to read, beyond what CORS always exposes.
    assert {"location", "retry-after", "x-request-id", "www-authenticate", "allow"} <= exposed
    assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= exposed
    assert "Access-Control-Allow-Credentials" not in response.headers
    # Preflight-only headers stay on the preflight.
    assert "Access-Control-Allow-Methods" not in response.headers


def assert_readable_error(response: TestResponse, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == code
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "retry-after" in names(response.headers["Access-Control-Expose-Headers"])


def test_error_responses_to_an_allowed_origin_can_be_read(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    # A browser hands a script no body, not even an error's, without the header.
    origin = {"Origin": APP}
    client = make_app(database_url, cors_origins=APP).test_client()
    assert_readable_error(ask(client, APP, question=""), 400, "invalid_question")
    assert_readable_error(client.get("/nope", headers=origin), 404, "not_found")
    assert_readable_error(client.put("/ask", headers=origin), 405, "method_not_allowed")
    too_big = client.post(
        "/ask", data=b"x" * 70_000, headers={**origin, "Content-Type": "application/json"}
    )
    assert_readable_error(too_big, 413, "payload_too_large")
    fake_openai.script(Status(429, headers={"Retry-After": "7"}))
    assert_readable_error(ask(client, APP), 503, "llm_rate_limited")

    secured = make_app(
        database_url, cors_origins=APP, api_tokens="tok", rate_limit="1/minute"
    ).test_client()
    assert_readable_error(secured.get("/questions", headers=origin), 401, "unauthorized")
    bearer = {**origin, "Authorization": "Bearer tok"}
    assert secured.get("/questions", headers=bearer).status_code == 200
    limited = secured.get("/questions", headers=bearer)
    assert_readable_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1

    down = make_app(UNREACHABLE_DATABASE, cors_origins=APP).test_client()
    assert_readable_error(down.get("/questions", headers=origin), 503, "database_unavailable")
    broken = make_app(broken_sqlite_file(tmp_path / "qna.db", "corrupt"), cors_origins=APP)
    response = broken.test_client().get("/questions", headers=origin)
    assert_readable_error(response, 503, "database_unavailable")


@pytest.mark.parametrize(
    "origin",
    [
        OTHER,
        "http://app.example.com",  # another scheme is another origin
        "https://app.example.com:8443",
        "https://app.example.com.evil.example",
        "https://evil.example",
        "null",  # a sandboxed frame or a file: page
    ],
)
def test_an_origin_not_in_the_list_gets_no_cors_headers(
    make_app: AppFactory, database_url: str, origin: str
) -> None:
    client = make_app(database_url, cors_origins=APP).test_client()

    allowed = preflight(client, origin)
    answered = ask(client, origin)
    refused = ask(client, origin, question="")

    assert allowed.status_code == 204  # OPTIONS answers all the same; the browser decides
    assert answered.status_code == 201
    assert refused.status_code == 400
    for response in (allowed, answered, refused):
        assert cors_headers(response) == {}, response.headers


def test_a_request_without_origin_gets_no_cors_headers(
    make_app: AppFactory, database_url: str
) -> None:
    # Not from a browser (or same-origin): there is nobody to tell.
    client = make_app(database_url, cors_origins=f"{APP},{OTHER}").test_client()

    response = client.post("/ask", json={"question": QUESTION})

    assert response.status_code == 201
    assert cors_headers(response) == {}


def test_with_listed_origins_every_response_varies_on_origin(
    make_app: AppFactory, database_url: str
) -> None:
    # A shared cache keys what it keeps on the request headers Vary names: without
    # Origin among them, an answer it kept for another origin, or for none (without
    # CORS headers), is served to a listed origin, and its browser refuses it.
    client = make_app(
        database_url, cors_origins=f"{APP},{OTHER}", api_tokens="tok", rate_limit="1/minute"
    ).test_client()
    bearer = {"Authorization": "Bearer tok"}
    docs_file = f"/docs/swagger-ui/{swagger_ui.VERSION}/swagger-ui.css"

    responses = {
        "no origin": client.get("/questions", headers=bearer),
        "listed": client.get("/healthz", headers={"Origin": APP}),
        "not listed": client.get("/healthz", headers={"Origin": "https://evil.example"}),
        "preflight": preflight(client, OTHER),
        "preflight, not listed": preflight(client, "https://evil.example"),
        "preflight, no origin": client.options("/ask"),
        "401": client.get("/questions"),
        "429": client.get("/questions", headers=bearer),
        "404": client.get("/nope", headers={"Origin": APP}),
        "405": client.put("/ask"),
        "docs": client.get("/docs"),
        "docs file": client.get(docs_file),
    }

    assert responses["429"].status_code == 429
    for name, response in responses.items():
        assert vary(response) == ["origin"], (name, response.headers)


def test_vary_on_origin_joins_what_a_response_varies_on_already(
    make_app: AppFactory, database_url: str
) -> None:
    app = make_app(database_url, cors_origins=APP)

    @app.get("/varied")
    def varied() -> Response:
        response = Response("x")
        response.headers["Vary"] = "Accept-Encoding, origin"
        response.headers.add("Vary", "Accept-Language")
        return response

    client = app.test_client()
    for headers in ({}, {"Origin": APP}, {"Origin": OTHER}):
        response = client.get("/varied", headers=headers)

        assert response.headers.getlist("Vary") == ["Accept-Encoding, origin, Accept-Language"]


@pytest.mark.parametrize("origins", [None, "*"])
def test_without_a_list_of_origins_nothing_varies_on_origin(
    make_app: AppFactory, database_url: str, origins: str | None
) -> None:
    # With no CORS, or "*" for everyone, every origin gets the same answer.
    setting = {"cors_origins": origins} if origins else {}
    client = make_app(database_url, **setting).test_client()

    for response in (
        client.get("/healthz"),
        client.get("/healthz", headers={"Origin": APP}),
        ask(client, OTHER),
        preflight(client, APP),
    ):
        assert "Vary" not in response.headers, response.headers


def test_an_ipv6_origin_matches_only_itself(make_app: AppFactory, database_url: str) -> None:
    # Brackets are a character class to a pattern matcher: "[::1]" must not match "1".
    client = make_app(database_url, cors_origins="http://[::1]:8080").test_client()

    assert ask(client, "http://[::1]:8080").headers["Access-Control-Allow-Origin"] == (
        "http://[::1]:8080"
    )
    for origin in ("http://1:8080", "http://::8080", "http://[::2]:8080"):
        assert cors_headers(ask(client, origin)) == {}, origin


def test_an_origin_is_matched_as_browsers_write_it(make_app: AppFactory, database_url: str) -> None:
    # A browser's Origin has a lower-case scheme and host, and no default port.
    client = make_app(database_url, cors_origins="HTTPS://App.Example.com:443").test_client()

    response = ask(client, APP)

    assert response.headers["Access-Control-Allow-Origin"] == APP


def test_any_origin_gets_the_wildcard_and_never_credentials(
    make_app: AppFactory, database_url: str
) -> None:
    client = make_app(database_url, cors_origins="*", api_tokens="tok").test_client()

    for response in (
        preflight(client, OTHER),
        ask(client, APP, Authorization="Bearer tok"),
        ask(client, OTHER),  # 401
    ):
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers
    assert names(preflight(client, APP).headers["Access-Control-Allow-Headers"]) == names(
        REQUESTED_HEADERS
    )


@pytest.mark.parametrize(
    "origins",
    [
        "app.example.com",  # no scheme
        "ftp://app.example.com",
        "null",
        "https://",
        "https://app.example.com/",  # a path, even "/": browsers send none
        "https://app.example.com/app",
        "https://app.example.com?x=1",
        "https://app.example.com#top",
        "https://user@app.example.com",
        "https://app.example.com:99999",
        "https://bücher.example",  # browsers send the xn-- form
        "https://*.example.com",  # exact origins, not patterns
        f"{APP}, *",  # * allows every origin: in a list it is a slip
        ",",
        " , ,",
    ],
)
def test_an_origin_that_is_not_one_is_refused(
    make_app: AppFactory, database_url: str, origins: str
) -> None:
    with pytest.raises(ConfigurationError, match="QNA_CORS_ORIGINS"):
        make_app(database_url, cors_origins=origins)
