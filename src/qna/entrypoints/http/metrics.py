"""Prometheus metrics of the HTTP service.

Under a multi-process server, `qna serve` sets PROMETHEUS_MULTIPROC_DIR before the
workers start, and /metrics then adds up every worker's numbers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from qna.domain.model import QnA

ASKS = Counter("qna_asks", "Asks handled over HTTP, by outcome.", ["outcome"])
LLM_LATENCY = Histogram(
    "qna_llm_latency_seconds",
    "Time spent waiting for the LLM per ask, retries included.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
TOKENS = Counter("qna_llm_tokens", "Tokens used by answered asks.", ["kind"])
CUT_OFF = Counter(
    "qna_answers_cut_off",
    "Answers the LLM cut off short, by finish_reason (length, content_filter).",
    ["reason"],
)
DATABASE_ERRORS = Counter("qna_database_errors", "Requests that failed on the database.")
# Looked up once: .labels() on every ask costs more than the increment.
_PROMPT_TOKENS = TOKENS.labels(kind="prompt")
_COMPLETION_TOKENS = TOKENS.labels(kind="completion")
_ASKED = {outcome: ASKS.labels(outcome=outcome) for outcome in ("answered", "cached")}


def record_ask(qna: QnA) -> None:
    """An answered ask (failed ones raise, and are counted by `record_failure`)."""
    outcome = "cached" if qna.source_id is not None else qna.status.value
    (_ASKED.get(outcome) or ASKS.labels(outcome=outcome)).inc()
    if qna.source_id is None and qna.latency_ms is not None:
        LLM_LATENCY.observe(qna.latency_ms / 1000)
    if qna.prompt_tokens:
        _PROMPT_TOKENS.inc(qna.prompt_tokens)
    if qna.completion_tokens:
        _COMPLETION_TOKENS.inc(qna.completion_tokens)
    if qna.is_cut_off and qna.source_id is None:
        CUT_OFF.labels(reason=qna.finish_reason).inc()


def record_failure(code: str) -> None:
    ASKS.labels(outcome=code).inc()


def exposition() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
