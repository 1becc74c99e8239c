"""README: "use redis://host:6379 so several workers share [the counters]". Two `qna serve`
processes on one Redis server: one budget between them, as an operator would see it."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.support.fake_openai import FakeOpenAI
from tests.support.redis_server import redis_server
from tests.support.serving import serve_env, serving_many

pytestmark = pytest.mark.slow


def test_processes_on_one_redis_share_one_budget(
    postgres_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as redis:
        env = serve_env(
            postgres_url, fake_openai, QNA_RATE_LIMIT="4/minute", QNA_RATE_LIMIT_STORAGE=redis.url
        )
        with serving_many(2, env, tmp_path, "--workers", "1") as (first, second):
            replies = [
                requests.get(f"{server.url}/questions", timeout=10)
                for server in (first, second, first, second, first, second)
            ]
    # Each process on its own (memory://) would have let all six through.
    assert [reply.status_code for reply in replies] == [200, 200, 200, 200, 429, 429]
    assert [reply.headers["X-RateLimit-Remaining"] for reply in replies[:4]] == ["3", "2", "1", "0"]
    assert replies[4].json()["error"]["code"] == "rate_limited"
