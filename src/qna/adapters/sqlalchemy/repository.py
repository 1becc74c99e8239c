"""QnARepository and UnitOfWork over one SQLAlchemy Core connection and transaction."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from uuid import UUID

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    Insert,
    Select,
    and_,
    bindparam,
    case,
    insert,
    literal,
    or_,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from qna.adapters.sqlalchemy.batching import StatementBatcher
from qna.adapters.sqlalchemy.database import (
    is_unavailable,
    set_driver_autocommit,
    storage_unavailable,
    unavailable_as_storage_error,
)
from qna.adapters.sqlalchemy.tables import (
    qn_a,
    row_values,
    to_domain,
)
from qna.application.ports import DuplicateIdempotencyKey, PageKey
from qna.domain.model import CUT_OFF_REASONS, OUTCOME_FIELDS, Abandonment, QnA, Status

# Built once: SQLAlchemy then reuses their compiled form for every ask.
_INSERT = insert(qn_a)
_SAVE_OUTCOME = (
    update(qn_a)
    .where(qn_a.c.id == bindparam("row_id"))
    # Column names are reserved for SQLAlchemy's own parameters, hence the prefix.
    .values({name: bindparam(f"new_{name}") for name in OUTCOME_FIELDS})
)
_CLOSE_PENDING = _SAVE_OUTCOME.where(qn_a.c.status == Status.PENDING.value)


_BY_ID = select(qn_a).where(qn_a.c.id == bindparam("row_id"))
# Ids in a range: a prefix of an id (`FindQnA`), served by the primary key.
_BY_ID_RANGE = (
    select(qn_a)
    .where(qn_a.c.id.between(bindparam("first"), bindparam("last")))
    .order_by(qn_a.c.id)
    .limit(bindparam("limit"))
)
_BY_KEY = select(qn_a).where(qn_a.c.idempotency_key == bindparam("key"))
_RELEASE_KEY = update(qn_a).where(qn_a.c.id == bindparam("row_id")).values(idempotency_key=None)


# The answer cache's source: the newest whole answer from the LLM to the same
# normalised question and model; served by ix_qn_a_question_key_model_created_at. An
# answer cut off (finish_reason "length", "content_filter") is never served again: it
# is read past, and the next older answer serves if it is whole.
_SOURCE = (
    select(qn_a.c.id, qn_a.c.answer, qn_a.c.response_model, qn_a.c.finish_reason)
    .where(
        qn_a.c.question_key == bindparam("question_key"),
        qn_a.c.model == bindparam("model"),
        qn_a.c.created_at >= bindparam("since"),
        qn_a.c.status == Status.ANSWERED.value,
        qn_a.c.source_id.is_(None),
        # Plain comparisons, not NOT IN: an IN list is rendered anew for each execution.
        or_(
            qn_a.c.finish_reason.is_(None),
            and_(*(qn_a.c.finish_reason != reason for reason in sorted(CUT_OFF_REASONS))),
        ),
    )
    .order_by(qn_a.c.created_at.desc())
    .limit(1)
    .subquery("source")
)


# What QnA.record_cached sets, in SQL: the columns a record answered from the cache
# takes from its source (or fixes), instead of the pending record's own values.
_ANSWERED_FROM_CACHE: dict[str, ColumnElement[Any]] = {
    "status": literal(Status.ANSWERED.value),
    "answer": _SOURCE.c.answer,
    "response_model": _SOURCE.c.response_model,
    "prompt_tokens": literal(0),
    "completion_tokens": literal(0),
    "finish_reason": _SOURCE.c.finish_reason,
    "latency_ms": literal(0),
    "answered_at": bindparam("now", type_=qn_a.c.answered_at.type),
    "source_id": _SOURCE.c.id,
}


def _value_to_add(column: Column[Any]) -> ColumnElement[Any]:
    given = bindparam(column.name, type_=column.type)
    from_cache = _ANSWERED_FROM_CACHE.get(column.name)
    if from_cache is None:
        return given
    return case((_SOURCE.c.id.is_not(None), from_cache), else_=given)


# The record answered from the cache if there is a source, else pending as given:
# one row either way, in one round trip. A LEFT JOIN of the look-up to a one-row
# relation, so that a miss still selects the pending row.
_ADD_OR_ANSWER_FROM_CACHE = (
    insert(qn_a)
    .from_select(
        [column.name for column in qn_a.c],
        select(*(_value_to_add(column) for column in qn_a.c)).select_from(
            select(literal(1).label("one")).subquery("one").outerjoin(_SOURCE, true())
        ),
    )
    .returning(*qn_a.c)
)


def add_or_answer_from_cache_statement(
    qna: QnA, *, since: datetime, now: datetime
) -> tuple[Insert, dict[str, Any]]:
    """The statement and its parameters (to EXPLAIN it)."""
    return _ADD_OR_ANSWER_FROM_CACHE, _add_or_answer_params(qna, since=since, now=now)


def _add_or_answer_params(qna: QnA, *, since: datetime, now: datetime) -> dict[str, Any]:
    return {**row_values(qna), "since": since, "now": now}


def _outcome_values(qna: QnA) -> dict[str, Any]:
    """The parameters of _SAVE_OUTCOME and _CLOSE_PENDING."""
    values = {f"new_{name}": getattr(qna, name) for name in OUTCOME_FIELDS}
    values["new_status"] = qna.status.value
    values["row_id"] = qna.id
    return values


@dataclass(frozen=True)
class WriteBatches:
    """The statements concurrent asks share (see batching.py); one set per engine."""

    insert: StatementBatcher = field(default_factory=lambda: StatementBatcher(_INSERT))
    save_outcome: StatementBatcher = field(default_factory=lambda: StatementBatcher(_SAVE_OUTCOME))


def write_batches_for(engine: Engine) -> WriteBatches | None:
    """Batches for PostgreSQL, where a shared statement is all or nothing: a multi-row
    INSERT is one statement, and psycopg2 sends the UPDATEs as one query string, which
    the server runs as one transaction. sqlite3 runs an executemany row by row, each
    committing on its own in autocommit mode; the embedded store writes alone."""
    return WriteBatches() if engine.dialect.name == "postgresql" else None


class SqlAlchemyQnARepository:
    """`connect` gives the unit of work's connection, checking it out on first use.

    With `batches` (autocommit units of work only), a new record and a saved outcome
    may go to the database in one statement with other asks' (batching.py). If such
    a write has to wait for its turn, `release` first gives the unit's connection
    back to the pool: asks that wait must not hold the connections the one running
    their statement needs (the pool has no overflow).
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        batches: WriteBatches | None = None,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self._connect = connect
        self._batches = batches
        self._release = release

    def add(self, qna: QnA) -> None:
        if self._batches is not None and qna.idempotency_key is None:
            # A record with a key is inserted alone: its unique constraint decides
            # between racing requests, and a conflict must fail only this ask.
            self._batches.insert.execute(
                self._connect, row_values(qna), before_waiting=self._release
            )
            return
        with _duplicate_key_raised(qna):
            self._connect().execute(_INSERT, row_values(qna))

    def save(self, qna: QnA) -> None:
        if self._batches is not None:
            self._batches.save_outcome.execute(
                self._connect, _outcome_values(qna), before_waiting=self._release
            )
            return
        self._connect().execute(_SAVE_OUTCOME, _outcome_values(qna))

    def close_pending(self, qna: QnA) -> bool:
        result = self._connect().execute(_CLOSE_PENDING, _outcome_values(qna))
        return result.rowcount == 1

    def get(self, qna_id: UUID) -> QnA | None:
        return self._first(_BY_ID, {"row_id": qna_id})

    def list_by_id(self, *, first: UUID, last: UUID, limit: int) -> Sequence[QnA]:
        params = {"first": first, "last": last, "limit": limit}
        return [to_domain(row) for row in self._connect().execute(_BY_ID_RANGE, params).mappings()]

    def list(
        self,
        *,
        limit: int,
        before: PageKey | None = None,
        status: Status | None = None,
        abandoned: Abandonment | None = None,
    ) -> Sequence[QnA]:
        query = list_statement(limit=limit, before=before, status=status, abandoned=abandoned)
        return [to_domain(row) for row in self._connect().execute(query).mappings()]

    def add_or_answer_from_cache(self, qna: QnA, *, since: datetime, now: datetime) -> QnA:
        params = _add_or_answer_params(qna, since=since, now=now)
        with _duplicate_key_raised(qna):
            row = self._connect().execute(_ADD_OR_ANSWER_FROM_CACHE, params).mappings().one()
        return to_domain(row)

    def list_pending(self, *, abandoned: Abandonment, limit: int) -> Sequence[QnA]:
        query = (
            select(qn_a)
            .where(_status_is(Status.PENDING), _is_abandoned(abandoned))
            .order_by(qn_a.c.created_at)
            .limit(limit)
        )
        return [to_domain(row) for row in self._connect().execute(query).mappings()]

    def get_by_idempotency_key(self, key: str) -> QnA | None:
        return self._first(_BY_KEY, {"key": key})

    def release_idempotency_key(self, qna_id: UUID) -> None:
        self._connect().execute(_RELEASE_KEY, {"row_id": qna_id})

    def _first(self, query: Select[Any], params: dict[str, Any] | None = None) -> QnA | None:
        row = self._connect().execute(query, params or {}).mappings().first()
        return to_domain(row) if row is not None else None


def list_statement(
    *,
    limit: int,
    before: PageKey | None = None,
    status: Status | None = None,
    abandoned: Abandonment | None = None,
) -> Select[Any]:
    """The query of `SqlAlchemyQnARepository.list` (to EXPLAIN it)."""
    if status is Status.FAILED and abandoned is not None:
        # Stored failures and abandoned pending records, each read from its own partial
        # index (tables.py), a page of each, then merged: asked for as one condition
        # (failed OR pending and abandoned), neither index serves it, and PostgreSQL
        # read the whole history back, filtering.
        parts = [
            _page(_status_is(Status.FAILED), before, limit).subquery(),
            _page(
                and_(_status_is(Status.PENDING), _is_abandoned(abandoned)), before, limit
            ).subquery(),
        ]
        merged = union_all(*(select(part) for part in parts)).subquery()
        return _newest_first(select(merged), merged.c).limit(limit)
    where = _read_as(status, abandoned) if status is not None else None
    return _page(where, before, limit)


def _page(where: ColumnElement[bool] | None, before: PageKey | None, limit: int) -> Select[Any]:
    query = _newest_first(select(qn_a), qn_a.c).limit(limit)
    if where is not None:
        query = query.where(where)
    if before is not None:
        # A row comparison, which both databases read as a bound on the (created_at,
        # id) index: a page deep in the history starts where it starts. Spelled out
        # as `created_at < x OR (created_at = x AND id < y)`, the same condition was a
        # filter on every newer row, and the pages got slower the further they went.
        # Bound as the columns' own types (UTCDateTime is stored naive on SQLite).
        after = tuple_(
            literal(before.created_at, qn_a.c.created_at.type), literal(before.id, qn_a.c.id.type)
        )
        query = query.where(tuple_(qn_a.c.created_at, qn_a.c.id) < after)
    return query


def _status_is(status: Status) -> ColumnElement[bool]:
    # Written into the SQL, not bound: SQLite uses a partial index (status =
    # 'failed') only for a query whose condition matches its own, literally.
    return qn_a.c.status == literal(status.value, literal_execute=True)


def _newest_first(query: Select[Any], columns: Any) -> Select[Any]:
    return query.order_by(columns.created_at.desc(), columns.id.desc())


def _read_as(status: Status, abandoned: Abandonment | None) -> ColumnElement[bool]:
    """Records a reader is told are in `status` (failed aside, which `list_statement`
    reads in two parts): a pending one that is `abandoned` is failed. On PostgreSQL
    the pending are served by their partial index (tables.py), the answered — nearly
    all — by the history's own."""
    stored = _status_is(status)
    if abandoned is None or status is not Status.PENDING:
        return stored
    own = qn_a.c.abandon_at
    # Not NOT(_is_abandoned): with abandon_at NULL, that is NULL, never true.
    in_time = or_(
        own >= abandoned.now, and_(own.is_(None), qn_a.c.created_at >= abandoned.created_before)
    )
    return and_(stored, in_time)


def _is_abandoned(abandoned: Abandonment) -> ColumnElement[bool]:
    """For a pending record: past its own abandon_at, or, without one (stored before
    0003), older than the reader's own cut-off (QnA.is_abandoned)."""
    own = qn_a.c.abandon_at
    return or_(
        own < abandoned.now,
        and_(own.is_(None), qn_a.c.created_at < abandoned.created_before),
    )


@contextlib.contextmanager
def _duplicate_key_raised(qna: QnA) -> Iterator[None]:
    """Inserting `qna`: its idempotency key already held is DuplicateIdempotencyKey."""
    try:
        yield
    except IntegrityError as exc:
        # Both PostgreSQL and SQLite name the constraint or column in the message.
        if qna.idempotency_key is not None and "idempotency_key" in str(exc.orig):
            raise DuplicateIdempotencyKey(qna.idempotency_key) from exc
        raise


class SqlAlchemyUnitOfWork:
    """One connection, one transaction; rolled back on exit unless committed.

    With `autocommit=True` the driver commits each statement as it runs: a lone
    INSERT or UPDATE is one round trip instead of three (BEGIN, the statement,
    COMMIT). Such a unit checks a connection out only when a statement needs one
    (a write that another ask runs in its batch needs none), and gives it back to the
    pool in transactional mode.
    """

    qnas: SqlAlchemyQnARepository

    def __init__(
        self, engine: Engine, *, autocommit: bool = False, batches: WriteBatches | None = None
    ) -> None:
        self._engine = engine
        self._autocommit = autocommit
        self._batches = batches if autocommit else None
        self._connection: Connection | None = None

    def __enter__(self) -> Self:
        self._connection = None
        if not self._autocommit:
            self._connect().begin()
        self.qnas = SqlAlchemyQnARepository(self._connect, self._batches, self._release)
        return self

    def _connect(self) -> Connection:
        if self._connection is not None:
            return self._connection
        with unavailable_as_storage_error():
            # Checking out replaces pooled connections a database restart killed
            # (database._drop_if_closed_by_server), before any work depends on them.
            self._connection = self._engine.connect()
            if self._autocommit:
                set_driver_autocommit(self._connection, True)
        return self._connection

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                self._give_back(connection)
            except DBAPIError as error:
                # The connection is already broken; the original error says more. With
                # none, the work was done: a connection that broke since (a restart, a
                # failover) took its transaction with it, as the rollback would have.
                if exc is None and not is_unavailable(error):
                    raise
        if exc is not None and is_unavailable(exc):
            raise storage_unavailable(exc) from exc

    def _release(self) -> None:
        """Give the connection back before waiting (autocommit: no transaction to keep);
        the next statement checks one out again."""
        if not self._autocommit:
            return  # a transaction lives on its connection
        connection, self._connection = self._connection, None
        if connection is not None:
            # Broken, and given up by SQLAlchemy: the next statement checks out anew.
            with contextlib.suppress(DBAPIError):
                self._give_back(connection)

    def _give_back(self, connection: Connection) -> None:
        try:
            connection.rollback()
        finally:
            # Even if the rollback failed: the connection must not go back to the pool
            # in autocommit mode.
            if self._autocommit:
                self._leave_autocommit(connection)
            connection.close()

    def commit(self) -> None:
        if self._connection is not None:
            self._connection.commit()

    def rollback(self) -> None:
        if self._connection is not None:
            self._connection.rollback()

    def _leave_autocommit(self, connection: Connection) -> None:
        if connection.invalidated:
            return  # SQLAlchemy dropped the broken driver connection already
        try:
            set_driver_autocommit(connection, False)
        except self._engine.dialect.loaded_dbapi.Error:
            # A connection that broke unnoticed refuses: it must not go back to the pool.
            connection.invalidate()
