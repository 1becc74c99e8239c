"""How qna looks from outside: one set of schemas for the CLI's --json, the HTTP API
and its OpenAPI document, so the three can never disagree."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from qna.domain.model import QnA


class AskRequest(BaseModel):
    """The body of POST /ask. Unknown fields are ignored; no object may name a key twice."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"question": "What is the capital of France?"}]},
    )

    question: StrictStr = Field(
        description="The question. Surrounding whitespace is stripped; it must not be empty, "
        "longer than QNA_MAX_QUESTION_LENGTH (default 4000) characters, or contain control "
        "characters other than newline and tab."
    )
    fresh: StrictBool = Field(
        False, description="Ask the LLM even when the answer cache (QNA_CACHE_TTL) has it."
    )


class StoredError(BaseModel):
    """Why a stored ask failed."""

    code: str = Field(description="The kind of failure, e.g. llm_timeout.")
    message: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable name, e.g. invalid_question.")
    message: str = Field(description="What went wrong, for a person.")
    qna_id: UUID | None = Field(
        None,
        description="When the LLM failed after the question was recorded: the stored "
        "(failed) record. Omitted otherwise.",
    )


class QnAOut(BaseModel):
    """One stored question and what became of it."""

    id: UUID
    question: str
    answer: str | None = Field(description="Null unless status is answered.")
    model: str = Field(description="The model asked for.")
    response_model: str | None = Field(description="The model the provider says answered.")
    status: Literal["pending", "answered", "failed"]
    error: StoredError | None = Field(description="Why it failed; null unless status is failed.")
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None = Field(
        description="Why the LLM stopped, as it said: stop (the answer is whole), length "
        "(cut off at the model's token limit), content_filter (cut by the provider's "
        "filter), or another provider's word. Null when status is not answered, when the "
        "LLM did not say, and in records stored before qna kept it. A cut-off answer is "
        "never served from the cache."
    )
    latency_ms: int | None = Field(description="Time spent waiting for the LLM, retries included.")
    created_at: datetime
    answered_at: datetime | None
    source_id: UUID | None = Field(
        description="Set when the answer came from the cache: the record it was copied from."
    )

    @classmethod
    def from_domain(cls, qna: QnA) -> QnAOut:
        return cls(
            id=qna.id,
            question=qna.question,
            answer=qna.answer,
            model=qna.model,
            response_model=qna.response_model,
            status=qna.status.value,
            error=(
                StoredError(code=qna.error_kind, message=qna.error_message or "")
                if qna.error_kind is not None
                else None
            ),
            prompt_tokens=qna.prompt_tokens,
            completion_tokens=qna.completion_tokens,
            finish_reason=qna.finish_reason,
            latency_ms=qna.latency_ms,
            created_at=qna.created_at,
            answered_at=qna.answered_at,
            source_id=qna.source_id,
        )


class QnAPage(BaseModel):
    items: list[QnAOut]
    next: str | None = Field(description="Cursor of the next (older) page; null on the last.")


class ErrorResponse(BaseModel):
    """Every error, on every route."""

    error: ErrorInfo
    record: QnAOut | None = Field(
        None,
        description="Only when the LLM answered (or failed) but the database would not "
        "store the outcome: the record as the ask left it, in the shape GET "
        "/questions/{id} gives, so that an answer already paid for still reaches the "
        "asker. The stored record stays pending until it is closed as abandoned. "
        "Omitted otherwise.",
    )


class Health(BaseModel):
    status: Literal["ok", "ready"]


def qna_to_dict(qna: QnA) -> dict[str, Any]:
    return QnAOut.from_domain(qna).model_dump(mode="json")
