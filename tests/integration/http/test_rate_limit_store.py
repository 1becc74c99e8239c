"""The rate limit's shared store (`QNA_RATE_LIMIT_STORAGE=redis://...`) against a real
Redis server of the test's own: what happens while it is down, and when it never answers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from flask_limiter import Limiter
from werkzeug.test import TestResponse

from tests.integration.conftest import AppFactory
from tests.support.redis_server import redis_server, silent_server

LIMIT = "3/minute"


def get(client: FlaskClient) -> TestResponse:
    return client.get("/questions")


def limiter_lines(stderr: str) -> list[dict[str, Any]]:
    """flask-limiter's own log lines, which qna writes as JSON like its own."""
    entries = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry["logger"] == "flask-limiter"]


def limiter_of(app: Flask) -> Limiter:
    [limiter] = app.extensions["limiter"]
    return limiter


def test_while_redis_is_down_each_process_counts_on_its_own_then_goes_back_to_it(
    make_app: AppFactory, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with redis_server(tmp_path) as redis:
        client = make_app(
            database_url, rate_limit=LIMIT, rate_limit_storage=redis.url, log_level="INFO"
        ).test_client()
        assert get(client).headers["X-RateLimit-Remaining"] == "2"

        redis.stop()
        # Not switched off: counted afresh in this process, with the whole budget.
        assert [get(client).status_code for _ in range(4)] == [200, 200, 200, 429]
        lines = limiter_lines(capsys.readouterr().err)
        # Said once, as a warning; the 429 is in qna's request log, not said again.
        assert [(line["level"], line["msg"]) for line in lines] == [
            ("warning", "Rate limit storage unreachable - falling back to in-memory storage")
        ]

        redis.start()
        # Tried again on a request now and then (1 s after the last try, then 2, 4, ...).
        give_up_at = time.monotonic() + 30
        while (response := get(client)).status_code == 429:
            assert time.monotonic() < give_up_at, "the limiter never went back to Redis"
            time.sleep(0.2)
        # The restarted server keeps nothing: counted there again, from the start.
        assert response.headers["X-RateLimit-Remaining"] == "2"
        assert "Rate limit storage recovered" in [
            line["msg"] for line in limiter_lines(capsys.readouterr().err)
        ]


def test_a_redis_that_never_answers_does_not_hold_the_request(
    make_app: AppFactory, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with silent_server() as url:
        client = make_app(database_url, rate_limit=LIMIT, rate_limit_storage=url).test_client()
        responses: list[TestResponse] = []
        asking = threading.Thread(target=lambda: responses.append(get(client)), daemon=True)
        asking.start()
        # Far longer than the store's timeout: no answer by then is a request held for
        # as long as the Redis client waits (no limit at all before redis-py 8).
        asking.join(timeout=30)
        assert responses, "the request is still waiting for Redis"
        assert responses[0].status_code == 200
        assert responses[0].headers["X-RateLimit-Remaining"] == "2"  # counted in-process
        assert "unreachable" in limiter_lines(capsys.readouterr().err)[0]["msg"]


@pytest.mark.parametrize(
    ("query", "timeout_s"),
    [("", 1.0), ("?socket_timeout=2.5&socket_connect_timeout=3", None)],
)
def test_redis_gets_a_timeout_of_a_second_unless_its_url_says_otherwise(
    make_app: AppFactory, database_url: str, query: str, timeout_s: float | None
) -> None:
    # Nothing is connected to until a request is counted.
    app = make_app(database_url, rate_limit=LIMIT, rate_limit_storage=f"redis://127.0.0.1:1{query}")
    redis_client = limiter_of(app).storage.storage  # type: ignore[attr-defined]
    options = redis_client.connection_pool.connection_kwargs
    expected = (timeout_s, timeout_s) if timeout_s is not None else (2.5, 3.0)
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == expected


@pytest.mark.parametrize(
    ("workers", "storage", "warned"),
    [
        (2, "memory://", True),
        (2, " Memory:", True),  # as flask-limiter reads it too
        (1, "memory://", False),
        (2, "redis://127.0.0.1:1", False),
    ],
    ids=["two-workers-memory", "memory-spelt-otherwise", "one-worker", "shared-store"],
)
def test_serve_warns_when_each_worker_counts_on_its_own(
    caplog: pytest.LogCaptureFixture, workers: int, storage: str, warned: bool
) -> None:
    # The default server (2 workers, memory://) let a client make twice the limit,
    # with X-RateLimit-Remaining going up and down between the workers' counts.
    from qna.config import Settings
    from qna.entrypoints.http import server

    settings = Settings(_env_file=None, rate_limit=LIMIT, rate_limit_storage=storage)

    with caplog.at_level("INFO", logger="qna.serve"):
        server._tell_what_it_serves(settings, workers)

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warnings) is warned
    if warned:
        assert warnings[0].startswith(
            "QNA_RATE_LIMIT is counted by each of the 2 workers on its own (memory://)"
        )


def test_the_serving_line_stars_a_password_wherever_the_url_holds_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from qna.config import Settings
    from qna.entrypoints.http import server

    for url in (
        "postgresql://qna:hunter2@db.example/qna",
        "postgresql://qna@db.example/qna?password=hunter2",  # as libpq takes it too
    ):
        caplog.clear()
        with caplog.at_level("INFO", logger="qna.serve"):
            server._tell_what_it_serves(Settings(_env_file=None, database_url=url), 1)

        [serving] = [r for r in caplog.records if r.getMessage() == "serving"]
        assert "hunter2" not in serving.database  # type: ignore[attr-defined]
        assert serving.database.startswith("postgresql")  # type: ignore[attr-defined]
