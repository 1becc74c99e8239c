"""The `qn_a` table (SQLAlchemy Core) and the translation between its rows and QnA.

Core rather than the ORM: a unit of work here is one or two statements, and the
ORM's session and identity map cost more CPU per ask than the statements themselves.
The domain never sees a row; rows never leave this package.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    RowMapping,
    String,
    Table,
    Text,
    Uuid,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from qna.domain.model import (
    MAX_FINISH_REASON_LENGTH,
    MAX_MODEL_LENGTH,
    QnA,
    Status,
    normalise_for_cache,
)

# Alembic's documented naming convention, so every constraint has a predictable name
# that later migrations can drop or alter on PostgreSQL and SQLite alike.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    SQLite has no time zones and hands back naive values; storing every value in UTC
    and re-attaching UTC on the way out keeps both databases in step.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def question_key(question: str) -> str:
    """Fixed-size key of the normalised question: indexable whatever the question's length."""
    return hashlib.sha256(normalise_for_cache(question).encode()).hexdigest()


_CACHEABLE = "status = 'answered' AND source_id IS NULL"
_PENDING = "status = 'pending'"
_FAILED = "status = 'failed'"

qn_a = Table(
    "qn_a",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("question", Text, nullable=False),
    Column("question_key", String(64), nullable=False),
    Column("answer", Text),
    Column("model", String(MAX_MODEL_LENGTH), nullable=False),
    Column("response_model", String(MAX_MODEL_LENGTH)),
    Column("status", String(16), nullable=False),
    Column("error_kind", String(64)),
    Column("error_message", Text),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("finish_reason", String(MAX_FINISH_REASON_LENGTH)),  # 0004
    Column("latency_ms", Integer),
    Column("created_at", UTCDateTime, nullable=False),
    Column("answered_at", UTCDateTime),
    Column("source_id", Uuid, ForeignKey("qn_a.id", ondelete="SET NULL")),
    # Unique: the database, not process memory, decides which of two concurrent
    # requests with one key asks the LLM (NULLs do not collide).
    Column("idempotency_key", String(255), unique=True),
    Column("request_fingerprint", String(64)),
    # When, still pending, the record counts as abandoned (QnA.abandon_at; 0003).
    Column("abandon_at", UTCDateTime),
    CheckConstraint("status IN ('pending', 'answered', 'failed')", name="status"),
    # Keyset pagination of the history, newest first.
    Index("ix_qn_a_created_at_id", "created_at", "id"),
    # Answer-cache look-up: same normalised question and model, newest first, among
    # answers that came from the LLM (partial: only those can be a cache source).
    Index(
        "ix_qn_a_question_key_model_created_at",
        "question_key",
        "model",
        "created_at",
        postgresql_where=text(_CACHEABLE),
        sqlite_where=text(_CACHEABLE),
    ),
    # Sweeping records whose asker died mid-call, and the pending (or abandoned) part
    # of a page of history, newest first (partial: pending rows are few; with `id`,
    # as SQLite needs a page's whole order from one index; 0005).
    Index(
        "ix_qn_a_pending_created_at_id",
        "created_at",
        "id",
        postgresql_where=text(_PENDING),
        sqlite_where=text(_PENDING),
    ),
    # The history of failures alone, newest first (partial: failures are few, and
    # without it a page of them would read the whole history to find one).
    Index(
        "ix_qn_a_failed_created_at_id",
        "created_at",
        "id",
        postgresql_where=text(_FAILED),
        sqlite_where=text(_FAILED),
    ),
)


def row_values(qna: QnA) -> dict[str, Any]:
    return {
        "id": qna.id,
        "question": qna.question,
        "question_key": question_key(qna.question),
        "answer": qna.answer,
        "model": qna.model,
        "response_model": qna.response_model,
        "status": qna.status.value,
        "error_kind": qna.error_kind,
        "error_message": qna.error_message,
        "prompt_tokens": qna.prompt_tokens,
        "completion_tokens": qna.completion_tokens,
        "finish_reason": qna.finish_reason,
        "latency_ms": qna.latency_ms,
        "created_at": qna.created_at,
        "answered_at": qna.answered_at,
        "source_id": qna.source_id,
        "idempotency_key": qna.idempotency_key,
        "request_fingerprint": qna.request_fingerprint,
        "abandon_at": qna.abandon_at,
    }


def to_domain(row: RowMapping) -> QnA:
    return QnA(
        id=row["id"],
        question=row["question"],
        answer=row["answer"],
        model=row["model"],
        response_model=row["response_model"],
        status=Status(row["status"]),
        error_kind=row["error_kind"],
        error_message=row["error_message"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        finish_reason=row["finish_reason"],
        latency_ms=row["latency_ms"],
        created_at=row["created_at"],
        answered_at=row["answered_at"],
        source_id=row["source_id"],
        idempotency_key=row["idempotency_key"],
        request_fingerprint=row["request_fingerprint"],
        abandon_at=row["abandon_at"],
    )
