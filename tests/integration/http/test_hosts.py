"""A server on the loopback address answers only to its own names (DNS rebinding)."""

from __future__ import annotations

import pytest

from qna.config import ConfigurationError, Settings
from qna.entrypoints.http.server import allowed_hosts
from tests.e2e.helpers import stored_rows
from tests.integration.conftest import AppFactory
from tests.support.fake_openai import FakeOpenAI

REBOUND = "rebind.attacker.example:5000"


@pytest.mark.parametrize(
    "host",
    ["localhost:5000", "127.0.0.1:5000", "127.0.0.2", "[::1]:5000", "LOCALHOST.", "app.localhost"],
)
def test_the_loopbacks_own_names_are_answered(
    make_app: AppFactory, database_url: str, host: str
) -> None:
    client = make_app(database_url, allowed_hosts=frozenset()).test_client()

    assert client.get("/questions", headers={"Host": host}).status_code == 200


def test_a_page_that_reached_the_server_by_its_own_name_is_refused(
    make_app: AppFactory, database_url: str, fake_openai: FakeOpenAI
) -> None:
    # DNS rebinding: the page's name resolves to 127.0.0.1, so its requests are
    # same-origin to the browser, past CORS; they read the history and asked the LLM.
    client = make_app(database_url, allowed_hosts=frozenset()).test_client()

    asked = client.post("/ask", json={"question": "Spend?"}, headers={"Host": REBOUND})
    read = client.get("/questions", headers={"Host": REBOUND})

    for response in (asked, read):
        assert response.status_code == 421
        error = response.get_json()["error"]
        assert error["code"] == "unknown_host"
        assert "rebind.attacker.example" in error["message"]
        assert "QNA_ALLOWED_HOSTS" in error["message"]
    assert fake_openai.calls == 0
    assert stored_rows(database_url) == []


def test_names_in_allowed_hosts_are_answered_too(make_app: AppFactory, database_url: str) -> None:
    client = make_app(database_url, allowed_hosts=frozenset({"qna.example.com"})).test_client()

    assert client.get("/questions", headers={"Host": "QNA.example.com:443"}).status_code == 200
    assert client.get("/questions", headers={"Host": "localhost"}).status_code == 200
    assert client.get("/questions", headers={"Host": "evil.example.com"}).status_code == 421


def test_the_openapi_document_names_421_only_when_the_check_is_on(
    make_app: AppFactory, database_url: str
) -> None:
    checked = make_app(database_url, allowed_hosts=frozenset()).test_client()
    open_ = make_app(database_url).test_client()

    for path, operations in checked.get("/openapi.json").get_json()["paths"].items():
        for method, operation in operations.items():  # /healthz and OPTIONS too
            assert "421" in operation["responses"], (path, method)
    for operations in open_.get("/openapi.json").get_json()["paths"].values():
        for operation in operations.values():
            assert "421" not in operation["responses"]
    assert checked.options("/healthz", headers={"Host": REBOUND}).status_code == 421
    assert open_.get("/questions", headers={"Host": REBOUND}).status_code == 200


@pytest.mark.parametrize(
    ("host", "setting", "answered"),
    [
        ("127.0.0.1", "", frozenset()),  # the default: loopback names only
        ("::1", "", frozenset()),
        # Other spellings of the loopback, as the system resolves them: the check was
        # off for these, which bind 127.0.0.1 all the same.
        ("127.1", "", frozenset()),
        ("LOCALHOST", "", frozenset()),
        ("2130706433", "", frozenset()),
        ("::ffff:127.0.0.1", "", frozenset()),
        ("localhost", "qna.example.com", frozenset({"qna.example.com"})),
        ("127.0.0.1", "*", None),
        ("0.0.0.0", "", None),  # on the network: any name, as before
        ("0.0.0.0", "qna.example.com,10.0.0.5", frozenset({"qna.example.com", "10.0.0.5"})),
    ],
)
def test_what_serve_answers_to(host: str, setting: str, answered: frozenset[str] | None) -> None:
    settings = Settings(_env_file=None, allowed_hosts=setting)

    assert allowed_hosts(settings, host) == answered


@pytest.mark.parametrize(
    "value", ["http://qna.example.com", "qna.example.com:443", "*.example.com", "*,a", ","]
)
def test_an_allowed_host_that_is_no_host_name_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigurationError, match="QNA_ALLOWED_HOSTS"):
        Settings(_env_file=None, allowed_hosts=value)


def test_allowed_hosts_are_kept_in_lower_case_without_brackets() -> None:
    settings = Settings(_env_file=None, allowed_hosts=" QNA.example.com. , [::1] ")

    assert settings.allowed_hosts == "qna.example.com,::1"
