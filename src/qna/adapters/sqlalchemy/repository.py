"""QnARepository and UnitOfWork over a SQLAlchemy session."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Self
from uuid import UUID

from sqlalchemy import Select, and_, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qna.adapters.sqlalchemy.database import UNAVAILABLE_ERRORS, storage_unavailable
from qna.adapters.sqlalchemy.orm import QnARow, question_key
from qna.application.ports import DuplicateIdempotencyKey, PageKey
from qna.domain.model import QnA, Status


def find_answered_query(normalised: str, model: str, since: datetime) -> Select[QnARow]:
    """The answer-cache look-up; served by ix_qn_a_question_key_model_created_at."""
    return (
        select(QnARow)
        .where(
            QnARow.question_key == question_key(normalised),
            QnARow.model == model,
            QnARow.created_at >= since,
            QnARow.status == Status.ANSWERED.value,
            QnARow.source_id.is_(None),
        )
        .order_by(QnARow.created_at.desc())
        .limit(1)
    )


class SqlAlchemyQnARepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, qna: QnA) -> None:
        try:
            self._session.execute(insert(QnARow).values(QnARow.values_from(qna)))
        except IntegrityError as exc:
            # Both PostgreSQL and SQLite name the constraint or column in the message.
            if qna.idempotency_key is not None and "idempotency_key" in str(exc.orig):
                raise DuplicateIdempotencyKey(qna.idempotency_key) from exc
            raise

    def save(self, qna: QnA) -> None:
        values = QnARow.values_from(qna)
        del values["id"]
        self._session.execute(update(QnARow).where(QnARow.id == qna.id).values(values))

    def get(self, qna_id: UUID) -> QnA | None:
        row = self._session.get(QnARow, qna_id)
        return row.to_domain() if row is not None else None

    def list(self, *, limit: int, before: PageKey | None = None) -> Sequence[QnA]:
        query = select(QnARow).order_by(QnARow.created_at.desc(), QnARow.id.desc()).limit(limit)
        if before is not None:
            query = query.where(
                or_(
                    QnARow.created_at < before.created_at,
                    and_(QnARow.created_at == before.created_at, QnARow.id < before.id),
                )
            )
        return [row.to_domain() for row in self._session.scalars(query)]

    def find_answered(self, *, normalised: str, model: str, since: datetime) -> QnA | None:
        row = self._session.scalars(find_answered_query(normalised, model, since)).first()
        return row.to_domain() if row is not None else None

    def list_pending(self, *, created_before: datetime, limit: int) -> Sequence[QnA]:
        query = (
            select(QnARow)
            .where(QnARow.status == Status.PENDING.value, QnARow.created_at < created_before)
            .order_by(QnARow.created_at)
            .limit(limit)
        )
        return [row.to_domain() for row in self._session.scalars(query)]

    def get_by_idempotency_key(self, key: str) -> QnA | None:
        query = select(QnARow).where(QnARow.idempotency_key == key)
        row = self._session.scalars(query).first()
        return row.to_domain() if row is not None else None

    def release_idempotency_key(self, qna_id: UUID) -> None:
        self._session.execute(
            update(QnARow).where(QnARow.id == qna_id).values(idempotency_key=None)
        )


class SqlAlchemyUnitOfWork:
    """One session, one transaction; rolled back on exit unless committed."""

    qnas: SqlAlchemyQnARepository

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def __enter__(self) -> Self:
        self._session = self._session_factory()
        self.qnas = SqlAlchemyQnARepository(self._session)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._session.rollback()
            self._session.close()
        except DBAPIError:
            # The connection is already broken; the original error says more.
            if exc is None:
                raise
        if isinstance(exc, UNAVAILABLE_ERRORS):
            raise storage_unavailable(exc) from exc

    def commit(self) -> None:
        self._session.commit()

    def rollback(self) -> None:
        self._session.rollback()
