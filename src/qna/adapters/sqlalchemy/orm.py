"""The `qn_a` table and the row class for it; kept apart from the domain's QnA."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from qna.domain.model import QnA, Status, normalise_for_cache

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


class Base(DeclarativeBase):
    metadata = metadata


_CACHEABLE = "status = 'answered' AND source_id IS NULL"
_PENDING = "status = 'pending'"


class QnARow(Base):
    __tablename__ = "qn_a"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'answered', 'failed')",
            name="status",
        ),
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
        # Sweeping records whose asker died mid-call (partial: pending rows are few).
        Index(
            "ix_qn_a_pending_created_at",
            "created_at",
            postgresql_where=text(_PENDING),
            sqlite_where=text(_PENDING),
        ),
    )

    id: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    question: Mapped[str] = mapped_column(Text)
    question_key: Mapped[str] = mapped_column(String(64))
    answer: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    response_model: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    error_kind: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    source_id: Mapped[UUID | None] = mapped_column(Uuid, ForeignKey("qn_a.id", ondelete="SET NULL"))
    # Unique: the database, not process memory, decides which of two concurrent
    # requests with one key asks the LLM (NULLs do not collide).
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))

    @staticmethod
    def values_from(qna: QnA) -> dict[str, Any]:
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
            "latency_ms": qna.latency_ms,
            "created_at": qna.created_at,
            "answered_at": qna.answered_at,
            "source_id": qna.source_id,
            "idempotency_key": qna.idempotency_key,
            "request_fingerprint": qna.request_fingerprint,
        }

    def to_domain(self) -> QnA:
        return QnA(
            id=self.id,
            question=self.question,
            answer=self.answer,
            model=self.model,
            response_model=self.response_model,
            status=Status(self.status),
            error_kind=self.error_kind,
            error_message=self.error_message,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_ms=self.latency_ms,
            created_at=self.created_at,
            answered_at=self.answered_at,
            source_id=self.source_id,
            idempotency_key=self.idempotency_key,
            request_fingerprint=self.request_fingerprint,
        )
