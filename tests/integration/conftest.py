"""The HTTP API under Flask's test client, over a real database and a local fake OpenAI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from qna.config import Settings
from qna.container import Container, create_container, shutdown
from qna.entrypoints.http.app import create_app
from tests.support.fake_openai import FakeOpenAI

# Small enough that an over-long question still fits in a body, and that the LLM
# timeout tests wait only a moment.
MAX_QUESTION_LENGTH = 1000
MAX_BODY_BYTES = 65536
LLM_TIMEOUT_S = 1.0

AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app(fake_openai: FakeOpenAI) -> Iterator[AppFactory]:
    """Build apps over the fake LLM; each container is shut down afterwards."""
    containers: list[Container] = []

    def build(
        database_url: str, *, allowed_hosts: frozenset[str] | None = None, **overrides: Any
    ) -> Flask:
        values: dict[str, Any] = {
            "database_url": database_url,
            "openai_base_url": fake_openai.base_url,
            "openai_api_key": "sk-test",
            "model": "gpt-test",
            "llm_max_attempts": 1,
            "llm_timeout_s": LLM_TIMEOUT_S,
            "llm_deadline_s": 10.0,
            "max_question_length": MAX_QUESTION_LENGTH,
            "max_body_bytes": MAX_BODY_BYTES,
            "cache_ttl_s": 0,
            "log_level": "WARNING",
        }
        settings = Settings(_env_file=None, **{**values, **overrides})  # type: ignore[call-arg]
        container = create_container(settings)
        containers.append(container)
        return create_app(container, allowed_hosts=allowed_hosts)

    yield build
    for container in reversed(containers):
        shutdown(container)


@pytest.fixture
def app(make_app: AppFactory, database_url: str) -> Flask:
    return make_app(database_url)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variables set (either case); set the test's own on the returned patch."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch
