"""How a QnA record looks from outside: one JSON shape for the CLI, HTTP and Python."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from qna.domain.model import QnA


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def qna_to_dict(qna: QnA) -> dict[str, Any]:
    return {
        "id": str(qna.id),
        "question": qna.question,
        "answer": qna.answer,
        "model": qna.model,
        "response_model": qna.response_model,
        "status": qna.status.value,
        "error": (
            {"code": qna.error_kind, "message": qna.error_message}
            if qna.error_kind is not None
            else None
        ),
        "prompt_tokens": qna.prompt_tokens,
        "completion_tokens": qna.completion_tokens,
        "latency_ms": qna.latency_ms,
        "created_at": _iso(qna.created_at),
        "answered_at": _iso(qna.answered_at),
        "source_id": str(qna.source_id) if qna.source_id is not None else None,
    }
