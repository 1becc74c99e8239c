"""The SQLAlchemy repository and unit of work, on SQLite and on real PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import IntegrityError

from qna.adapters.sqlalchemy.batching import StatementBatcher
from qna.adapters.sqlalchemy.database import create_engine
from qna.adapters.sqlalchemy.repository import (
    SqlAlchemyUnitOfWork,
    WriteBatches,
    write_batches_for,
)
from qna.application.ports import PageKey
from qna.domain.errors import LLMTimeout
from qna.domain.model import Abandonment, QnA, Status

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
def uow(engine: Engine) -> SqlAlchemyUnitOfWork:
    return SqlAlchemyUnitOfWork(engine)


def store(uow: SqlAlchemyUnitOfWork, *records: QnA) -> None:
    with uow:
        for record in records:
            uow.qnas.add(record)
        uow.commit()


def test_round_trip_keeps_every_field(uow: SqlAlchemyUnitOfWork) -> None:
    qna = QnA.ask("What is the capital of France? 🇫🇷 مرحبا e\u0301", model="m", now=T0)
    qna.record_answer(
        answer="Paris.",
        model="m-2026",
        prompt_tokens=12,
        completion_tokens=3,
        latency_ms=250,
        now=T0 + timedelta(seconds=1),
        finish_reason="length",
    )
    store(uow, qna)

    with uow:
        loaded = uow.qnas.get(qna.id)

    assert loaded == qna
    assert loaded is not None and loaded.created_at.tzinfo is not None


def test_save_writes_back_the_outcome(uow: SqlAlchemyUnitOfWork) -> None:
    qna = QnA.ask("Why?", model="m", now=T0)
    store(uow, qna)
    qna.record_failure(LLMTimeout("took too long"), latency_ms=5000, now=T0)
    with uow:
        uow.qnas.save(qna)
        uow.commit()

    with uow:
        loaded = uow.qnas.get(qna.id)

    assert loaded is not None
    assert loaded.status is Status.FAILED
    assert (loaded.error_kind, loaded.error_message) == ("llm_timeout", "took too long")


def test_leaving_without_commit_rolls_back(uow: SqlAlchemyUnitOfWork) -> None:
    qna = QnA.ask("Lost?", model="m", now=T0)
    with uow:
        uow.qnas.add(qna)

    with uow:
        assert uow.qnas.get(qna.id) is None


def test_an_error_inside_rolls_back(uow: SqlAlchemyUnitOfWork) -> None:
    qna = QnA.ask("Lost?", model="m", now=T0)
    with pytest.raises(RuntimeError), uow:
        uow.qnas.add(qna)
        raise RuntimeError("boom")

    with uow:
        assert uow.qnas.get(qna.id) is None


def test_get_of_unknown_id_is_none(uow: SqlAlchemyUnitOfWork) -> None:
    with uow:
        assert uow.qnas.get(uuid4()) is None


def test_list_by_id_finds_the_ids_in_a_range_in_id_order(uow: SqlAlchemyUnitOfWork) -> None:
    # Bounds and their neighbours, where a text order of the stored form and the
    # order of the ids could part: digits against letters, the first and last digit.
    ids = [
        "0fffffff-ffff-4fff-bfff-ffffffffffff",
        "10000000-0000-4000-8000-000000000000",
        "1000000a-0000-4000-8000-000000000000",
        "1fffffff-ffff-4fff-bfff-ffffffffffff",
        "20000000-0000-4000-8000-000000000000",
        "a0000000-0000-4000-8000-000000000000",
    ]
    records = [QnA.ask(f"Q{n}", model="m", now=T0) for n in range(len(ids))]
    for record, qna_id in zip(records, ids, strict=True):
        record.id = UUID(qna_id)
    store(uow, *reversed(records))
    first = UUID("10000000-0000-0000-0000-000000000000")
    last = UUID("1fffffff-ffff-ffff-ffff-ffffffffffff")

    with uow:
        found = uow.qnas.list_by_id(first=first, last=last, limit=5)
        two = uow.qnas.list_by_id(first=first, last=last, limit=2)
        letters = uow.qnas.list_by_id(
            first=UUID(int=0xA << 124), last=UUID(int=2**128 - 1), limit=5
        )

    assert [str(qna.id) for qna in found] == ids[1:4]
    assert found[0] == records[1]
    assert [str(qna.id) for qna in two] == ids[1:3]
    assert [str(qna.id) for qna in letters] == ids[5:]


def test_list_is_newest_first_with_keyset_pages(uow: SqlAlchemyUnitOfWork) -> None:
    # Two records share a timestamp, so the id must break the tie consistently.
    records = [QnA.ask(f"q{i}", model="m", now=T0 + timedelta(seconds=i // 2)) for i in range(7)]
    store(uow, *records)
    expected = sorted(records, key=lambda q: (q.created_at, q.id), reverse=True)

    seen: list[QnA] = []
    before = None
    while True:
        with uow:
            page = list(uow.qnas.list(limit=3, before=before))
        if not page:
            break
        seen.extend(page)
        before = PageKey(created_at=page[-1].created_at, id=page[-1].id)

    assert [q.id for q in seen] == [q.id for q in expected]


def test_add_or_answer_from_cache_answers_from_the_newest_llm_answer(
    uow: SqlAlchemyUnitOfWork, engine: Engine
) -> None:
    old = QnA.ask("What is 2+2?", model="m", now=T0 - timedelta(hours=2))
    old.record_answer(
        answer="3", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    recent = QnA.ask("what  is 2+2?", model="m", now=T0)
    recent.record_answer(
        answer="4",
        model="m-2026",
        prompt_tokens=1,
        completion_tokens=1,
        latency_ms=1,
        now=T0,
        finish_reason="stop",
    )
    cut_off = []  # newer, but not whole: never served again
    for reason in ("length", "content_filter"):
        record = QnA.ask("What is 2+2?", model="m", now=T0 + timedelta(seconds=1))
        record.record_answer(
            answer="The answer is",
            model="m",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1,
            now=T0,
            finish_reason=reason,
        )
        cut_off.append(record)
    copy_of_recent = QnA.ask("What is 2+2?", model="m", now=T0 + timedelta(seconds=1))
    copy_of_recent.record_cached(old, now=T0)  # newer, but not answered by the LLM
    other_model = QnA.ask("What is 2+2?", model="other", now=T0 + timedelta(seconds=1))
    other_model.record_answer(
        answer="5", model="other", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    failed = QnA.ask("What is 2+2?", model="m", now=T0 + timedelta(seconds=2))
    failed.record_failure(LLMTimeout("slow"), latency_ms=1, now=T0)
    store(uow, old, recent, *cut_off, copy_of_recent, other_model, failed)

    asked = QnA.ask("WHAT IS 2+2?", model="m", now=T0 + timedelta(seconds=3))
    with SqlAlchemyUnitOfWork(engine, autocommit=True) as writing:
        added = writing.qnas.add_or_answer_from_cache(
            asked, since=T0 - timedelta(hours=1), now=T0 + timedelta(seconds=4)
        )
    with uow:
        stored = uow.qnas.get(asked.id)

    expected = replace(asked)
    expected.record_cached(recent, now=T0 + timedelta(seconds=4))
    assert expected.finish_reason == "stop"
    assert added == expected
    assert stored == expected
    assert asked.status is Status.PENDING  # the caller's record is left as it was


@pytest.mark.parametrize(
    ("question", "model", "since"),
    [
        ("What is 3+3?", "m", T0 - timedelta(hours=1)),  # another question
        ("What is 2+2?", "other", T0 - timedelta(hours=1)),  # another model
        ("What is 2+2?", "m", T0 + timedelta(seconds=1)),  # the answer is too old
    ],
)
def test_add_or_answer_from_cache_adds_it_pending_without_a_source(
    uow: SqlAlchemyUnitOfWork, engine: Engine, question: str, model: str, since: datetime
) -> None:
    answered = QnA.ask("What is 2+2?", model="m", now=T0)
    answered.record_answer(
        answer="4", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    store(uow, answered)

    asked = QnA.ask(question, model=model, now=T0 + timedelta(seconds=3))
    with SqlAlchemyUnitOfWork(engine, autocommit=True) as writing:
        added = writing.qnas.add_or_answer_from_cache(asked, since=since, now=T0)
    with uow:
        stored = uow.qnas.get(asked.id)

    assert added == asked
    assert stored == asked
    assert stored is not None and stored.status is Status.PENDING


def test_list_by_status_counts_a_pending_record_older_than_the_cutoff_as_failed(
    uow: SqlAlchemyUnitOfWork,
) -> None:
    failed = QnA.ask("failed", model="m", now=T0 - timedelta(hours=2))
    failed.record_failure(LLMTimeout("slow"), latency_ms=1, now=T0)
    answered = QnA.ask("answered", model="m", now=T0 - timedelta(hours=1, seconds=1))
    answered.record_answer(
        answer="a", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    stale = QnA.ask("stale", model="m", now=T0 - timedelta(hours=1))
    fresh = QnA.ask("fresh", model="m", now=T0)
    at_the_cutoff = QnA.ask("at the cutoff", model="m", now=T0 - timedelta(minutes=5))
    store(uow, failed, answered, stale, fresh, at_the_cutoff)
    abandoned = Abandonment(T0, timedelta(minutes=5))  # created before T0 - 5 min

    def listed(status: Status | None, **kwargs: Any) -> list[str]:
        with uow:
            records = uow.qnas.list(limit=10, status=status, abandoned=abandoned, **kwargs)
        return [q.question for q in records]

    assert listed(Status.FAILED) == ["stale", "failed"]
    assert listed(Status.PENDING) == ["fresh", "at the cutoff"]
    assert listed(Status.ANSWERED) == ["answered"]
    assert listed(None) == ["fresh", "at the cutoff", "stale", "answered", "failed"]
    assert listed(Status.FAILED, before=PageKey(created_at=stale.created_at, id=stale.id)) == [
        "failed"
    ]
    with uow:
        as_stored = uow.qnas.list(limit=10, status=Status.PENDING)
    assert [q.question for q in as_stored] == ["fresh", "at the cutoff", "stale"]


def test_a_pending_record_that_says_when_it_is_abandoned_is_judged_by_that(
    uow: SqlAlchemyUnitOfWork,
) -> None:
    # Asked by processes allowed more, and less, time than this reader's 5 minutes.
    patient = QnA.ask("patient", model="m", now=T0 - timedelta(hours=1))
    patient.abandon_at = T0 + timedelta(minutes=1)
    hasty = QnA.ask("hasty", model="m", now=T0 - timedelta(minutes=2))
    hasty.abandon_at = T0 - timedelta(minutes=1)
    store(uow, patient, hasty)
    abandoned = Abandonment(T0, timedelta(minutes=5))

    def listed(status: Status) -> list[str]:
        with uow:
            records = uow.qnas.list(limit=10, status=status, abandoned=abandoned)
        return [q.question for q in records]

    assert listed(Status.PENDING) == ["patient"]
    assert listed(Status.FAILED) == ["hasty"]
    with uow:
        assert [q.id for q in uow.qnas.list_pending(abandoned=abandoned, limit=10)] == [hasty.id]
        assert uow.qnas.get(patient.id) == patient  # abandon_at stored and read back


def test_pages_of_failures_interleave_the_stored_and_the_abandoned_in_time_order(
    uow: SqlAlchemyUnitOfWork,
) -> None:
    # The two kinds are read apart (each from its index) and merged: every page is the
    # newest of both, and a walk of the pages meets each record once.
    records = []
    for minute in range(6):
        qna = QnA.ask(f"asked {minute} min after", model="m", now=T0 + timedelta(minutes=minute))
        if minute % 2:
            qna.record_failure(LLMTimeout("slow"), latency_ms=1, now=T0)
        records.append(qna)
    store(uow, *records)
    abandoned = Abandonment(T0 + timedelta(hours=1), timedelta(0))  # every pending one

    walked: list[list[str]] = []
    before = None
    while True:
        with uow:
            page = uow.qnas.list(limit=2, status=Status.FAILED, abandoned=abandoned, before=before)
        if not page:
            break
        walked.append([q.question for q in page])
        before = PageKey(created_at=page[-1].created_at, id=page[-1].id)

    newest_first = [q.question for q in reversed(records)]
    assert walked == [newest_first[0:2], newest_first[2:4], newest_first[4:6]]


def test_list_pending_finds_old_pending_only(uow: SqlAlchemyUnitOfWork) -> None:
    stale = QnA.ask("stale", model="m", now=T0 - timedelta(hours=1))
    fresh = QnA.ask("fresh", model="m", now=T0)
    done = QnA.ask("done", model="m", now=T0 - timedelta(hours=1))
    done.record_answer(
        answer="a", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    store(uow, stale, fresh, done)

    with uow:
        pending = uow.qnas.list_pending(abandoned=Abandonment(T0, timedelta(minutes=5)), limit=10)

    assert [q.id for q in pending] == [stale.id]


def test_sql_looking_text_is_stored_verbatim(uow: SqlAlchemyUnitOfWork, engine: Engine) -> None:
    question = '\'); DROP TABLE qn_a; -- \\ % _ "quoted"'
    qna = QnA.ask(question, model="m", now=T0)
    store(uow, qna)

    with engine.connect() as connection:
        stored = connection.execute(text("SELECT question FROM qn_a")).scalar_one()

    assert stored == question


def test_status_is_constrained_by_the_database(engine: Engine) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO qn_a (id, question, question_key, model, status, created_at)"
                " VALUES (:id, 'q', 'k', 'm', 'lost', :now)"
            ),
            {"id": uuid4().hex if engine.dialect.name == "sqlite" else str(uuid4()), "now": T0},
        )


def test_a_statement_the_database_refuses_is_not_taken_for_an_unavailable_database(
    uow: SqlAlchemyUnitOfWork,
) -> None:
    # A broken SQLite file is reported as unavailable; a DatabaseError that says the
    # statement was wrong (here a duplicate primary key) must stay what it is.
    from sqlalchemy.exc import IntegrityError

    qna = QnA.ask("Twice?", model="m", now=T0)
    store(uow, qna)

    with pytest.raises(IntegrityError):
        store(uow, qna)


def test_close_pending_writes_only_while_the_record_is_pending(uow: SqlAlchemyUnitOfWork) -> None:
    still_pending = QnA.ask("Lost?", model="m", now=T0)
    answered_since = QnA.ask("Late?", model="m", now=T0)
    store(uow, still_pending, answered_since)
    stale_copy = QnA(**vars(answered_since))  # read while it was still pending
    answered_since.record_answer(
        answer="Here.", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=9, now=T0
    )
    with uow:
        uow.qnas.save(answered_since)
        uow.commit()

    still_pending.abandon(now=T0 + timedelta(hours=1))
    stale_copy.abandon(now=T0 + timedelta(hours=1))
    with uow:
        closed = [uow.qnas.close_pending(still_pending), uow.qnas.close_pending(stale_copy)]
        uow.commit()

    assert closed == [True, False]
    with uow:
        first, second = uow.qnas.get(still_pending.id), uow.qnas.get(answered_since.id)
    assert first is not None and (first.status, first.error_kind) == (Status.FAILED, "abandoned")
    assert second is not None and (second.status, second.answer) == (Status.ANSWERED, "Here.")


def visible_elsewhere(engine: Engine, qna: QnA) -> bool:
    """Whether a separate unit of work (another pooled connection) sees the record."""
    with SqlAlchemyUnitOfWork(engine) as other:
        return other.qnas.get(qna.id) is not None


def test_an_autocommit_unit_commits_each_write_as_it_runs(engine: Engine) -> None:
    qna = QnA.ask("Kept at once?", model="m", now=T0)
    with SqlAlchemyUnitOfWork(engine, autocommit=True) as uow:
        uow.qnas.add(qna)
        # Committed already: the block has not ended and nothing called commit().
        assert visible_elsewhere(engine, qna)
        qna.record_answer(
            answer="Yes.", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=3, now=T0
        )
        uow.qnas.save(qna)
        uow.rollback()  # nothing to roll back: each statement stood alone

    with SqlAlchemyUnitOfWork(engine) as uow:
        loaded = uow.qnas.get(qna.id)
    assert loaded is not None and (loaded.status, loaded.answer) == (Status.ANSWERED, "Yes.")


def test_a_failed_autocommit_insert_stores_nothing(engine: Engine) -> None:
    holder = QnA.ask("First?", model="m", now=T0)
    holder.idempotency_key = "same-key"
    second = QnA.ask("Second?", model="m", now=T0)
    second.idempotency_key = "same-key"
    with SqlAlchemyUnitOfWork(engine, autocommit=True) as uow:
        uow.qnas.add(holder)

    from qna.application.ports import DuplicateIdempotencyKey

    with (
        pytest.raises(DuplicateIdempotencyKey),
        SqlAlchemyUnitOfWork(engine, autocommit=True) as uow,
    ):
        uow.qnas.add(second)

    assert visible_elsewhere(engine, holder)
    assert not visible_elsewhere(engine, second)


def test_a_connection_used_in_autocommit_is_transactional_again_for_the_next_unit(
    engine: Engine,
) -> None:
    # More rounds than the pool has connections, so every pooled connection is
    # checked out in autocommit mode and then again for an ordinary unit of work.
    for round_ in range(engine.pool.size() + 2 if hasattr(engine.pool, "size") else 3):
        kept = QnA.ask(f"Kept {round_}?", model="m", now=T0)
        lost = QnA.ask(f"Lost {round_}?", model="m", now=T0)
        with SqlAlchemyUnitOfWork(engine, autocommit=True) as uow:
            uow.qnas.add(kept)
        with SqlAlchemyUnitOfWork(engine) as uow:
            uow.qnas.add(lost)
            # Not committed: leaving the block must roll it back.
        assert visible_elsewhere(engine, kept)
        assert not visible_elsewhere(engine, lost)


# -- writes that concurrent asks share (batching.py; PostgreSQL only) ---------------------


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM qn_a"))
    yield engine
    engine.dispose()


def test_a_connection_that_breaks_after_the_work_is_done_fails_nothing(
    pg_engine: Engine,
) -> None:
    # The server ends the session between the read and the unit's rollback (a
    # restart, a failover): the read was done, and a 500 told the reader otherwise.
    record = QnA.ask("Read, then dropped?", model="m", now=T0)
    with SqlAlchemyUnitOfWork(pg_engine, autocommit=True) as uow:
        uow.qnas.add(record)
    admin = pg_engine.connect()
    try:
        with SqlAlchemyUnitOfWork(pg_engine) as uow:
            read = uow.qnas.get(record.id)
            pid = uow._connect().exec_driver_sql("SELECT pg_backend_pid()").scalar()
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            admin.commit()
            _wait_until_gone(admin, pid)
    finally:
        admin.close()

    assert read == record
    with SqlAlchemyUnitOfWork(pg_engine) as uow:  # the pool is sound
        assert uow.qnas.get(record.id) == record


def _wait_until_gone(admin: Connection, pid: int) -> None:
    deadline = time.monotonic() + 10
    query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
    while admin.execute(query, {"pid": pid}).scalar():
        assert time.monotonic() < deadline, f"backend {pid} still there"
        admin.rollback()
        time.sleep(0.01)


def test_only_postgresql_shares_statements(engine: Engine) -> None:
    # sqlite3's executemany commits row by row in autocommit mode: a batch that
    # failed halfway could not be retried row by row.
    batches = write_batches_for(engine)
    assert (batches is not None) == (engine.dialect.name == "postgresql")


class Writes:
    """Counts the INSERTs and UPDATEs of qn_a and the connections checked out; can
    hold the first such statement until the rows behind it have queued."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[tuple[str, bool]] = []
        self.checkouts = 0
        #: Connections checked out once the rows had queued behind the first statement.
        self.checked_out_while_queued: int | None = None
        self._engine = engine
        self._held = threading.Event()
        self._go = threading.Event()
        self._go.set()
        event.listen(engine, "before_cursor_execute", self._before_execute)
        event.listen(engine, "checkout", self._checked_out)

    def _before_execute(self, *args: Any) -> None:
        statement, executemany = args[2], args[5]
        if statement.startswith(("INSERT INTO qn_a", "UPDATE qn_a")):
            self.statements.append((statement.split()[0], executemany))
            self._held.set()
            assert self._go.wait(10)

    def _checked_out(self, *_args: Any) -> None:
        self.checkouts += 1

    def run_behind_first(
        self, batcher: StatementBatcher, write: Callable[[QnA], None], records: list[QnA]
    ) -> dict[str, BaseException]:
        """Write records[0], and records[1:] while its statement runs; each write's
        error by question."""
        errors: dict[str, BaseException] = {}

        def run(qna: QnA) -> None:
            try:
                write(qna)
            except BaseException as exc:
                errors[qna.question] = exc

        self._held.clear()
        self._go.clear()
        threads = [threading.Thread(target=run, args=(records[0],))]
        threads[0].start()
        assert self._held.wait(10)
        threads += [threading.Thread(target=run, args=(qna,)) for qna in records[1:]]
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 10
        while batcher.queued < len(records) - 1:
            assert time.monotonic() < deadline, f"{batcher.queued} rows queued"
            time.sleep(0.001)
        # A caller queues its row, then gives back the connection it holds: give the
        # last one a moment to (a caller that keeps its connection never does).
        pool = self._engine.pool
        settle_by = time.monotonic() + 2
        while pool.checkedout() > 1 and time.monotonic() < settle_by:  # type: ignore[attr-defined]
            time.sleep(0.001)
        self.checked_out_while_queued = pool.checkedout()  # type: ignore[attr-defined]
        self._go.set()
        for thread in threads:
            thread.join(10)
        return errors


def add_with(engine: Engine, batches: WriteBatches) -> Callable[[QnA], None]:
    def add(qna: QnA) -> None:
        with SqlAlchemyUnitOfWork(engine, autocommit=True, batches=batches) as uow:
            uow.qnas.add(qna)

    return add


def test_concurrent_asks_share_their_inserts_and_updates_and_each_lands(pg_engine: Engine) -> None:
    batches, writes = WriteBatches(), Writes(pg_engine)
    records = [QnA.ask(f"Shared {n}?", model="m", now=T0) for n in range(6)]

    errors = writes.run_behind_first(batches.insert, add_with(pg_engine, batches), records)
    assert errors == {}
    assert writes.statements == [("INSERT", False), ("INSERT", True)]
    # A caller whose row another ran checked out no connection.
    assert writes.checkouts == 2

    def save(qna: QnA) -> None:
        qna.record_answer(
            answer=f"A to {qna.question}",
            model="m2",
            prompt_tokens=1,
            completion_tokens=2,
            latency_ms=3,
            now=T0,
        )
        with SqlAlchemyUnitOfWork(pg_engine, autocommit=True, batches=batches) as uow:
            uow.qnas.save(qna)

    writes.statements.clear()
    assert writes.run_behind_first(batches.save_outcome, save, records) == {}
    assert writes.statements == [("UPDATE", False), ("UPDATE", True)]

    with SqlAlchemyUnitOfWork(pg_engine) as uow:
        stored = [uow.qnas.get(qna.id) for qna in records]
    assert [(s.status, s.answer, s.response_model) for s in stored if s is not None] == [
        (Status.ANSWERED, f"A to {qna.question}", "m2") for qna in records
    ]


def test_a_row_that_breaks_a_constraint_fails_only_its_own_ask(pg_engine: Engine) -> None:
    batches, writes = WriteBatches(), Writes(pg_engine)
    taken = QnA.ask("Already here?", model="m", now=T0)
    add_with(pg_engine, batches)(taken)
    records = [QnA.ask(f"Fine {n}?", model="m", now=T0) for n in range(4)]
    clash = QnA.ask("Same id?", model="m", now=T0)
    clash.id = taken.id
    records.insert(2, clash)

    errors = writes.run_behind_first(batches.insert, add_with(pg_engine, batches), records)

    assert list(errors) == ["Same id?"] and isinstance(errors["Same id?"], IntegrityError)
    assert all(visible_elsewhere(pg_engine, qna) for qna in records if qna is not clash)
    with SqlAlchemyUnitOfWork(pg_engine) as uow:
        kept = uow.qnas.get(taken.id)
    assert kept is not None and kept.question == "Already here?"


def test_a_row_the_driver_will_not_send_fails_only_its_own_ask(pg_engine: Engine) -> None:
    # psycopg2 refuses a string with NUL itself (ValueError), before anything is sent.
    batches, writes = WriteBatches(), Writes(pg_engine)
    records = [QnA.ask(f"Fine {n}?", model="m", now=T0) for n in range(4)]
    unsendable = QnA.ask("With NUL?", model="m", now=T0)
    unsendable.model = "m\x00"
    records.insert(2, unsendable)

    errors = writes.run_behind_first(batches.insert, add_with(pg_engine, batches), records)

    assert list(errors) == ["With NUL?"] and isinstance(errors["With NUL?"], ValueError)
    assert all(visible_elsewhere(pg_engine, qna) for qna in records if qna is not unsendable)
    assert not visible_elsewhere(pg_engine, unsendable)


def test_a_record_with_an_idempotency_key_is_inserted_alone(pg_engine: Engine) -> None:
    batches, writes = WriteBatches(), Writes(pg_engine)
    keyed = QnA.ask("Keyed?", model="m", now=T0)
    keyed.idempotency_key = "k-1"
    add_with(pg_engine, batches)(keyed)
    assert batches.insert.queued == 0
    assert writes.statements == [("INSERT", False)]
    assert visible_elsewhere(pg_engine, keyed)


def test_an_ask_waiting_for_its_turn_holds_no_connection(postgres_url: str) -> None:
    # A pool of 2: the first statement holds one connection; two units of work that
    # read first (so each had checked one out) queue behind it. Holding theirs while
    # they wait, they would starve whoever runs their statement.
    engine = create_engine(postgres_url, pool_size=2, connect_timeout=2)
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM qn_a"))
        batches, writes = WriteBatches(), Writes(engine)

        def look_up_then_add(qna: QnA) -> None:
            with SqlAlchemyUnitOfWork(engine, autocommit=True, batches=batches) as uow:
                uow.qnas.get(qna.id)
                uow.qnas.add(qna)

        records = [QnA.ask(f"Looked up {n}?", model="m", now=T0) for n in range(3)]
        assert writes.run_behind_first(batches.insert, look_up_then_add, records) == {}
        assert writes.checked_out_while_queued == 1
        assert all(visible_elsewhere(engine, qna) for qna in records)
    finally:
        engine.dispose()
