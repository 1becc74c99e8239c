"""The SQLAlchemy repository and unit of work, on SQLite and on real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from sqlalchemy import Engine, text

from qna.adapters.sqlalchemy.repository import SqlAlchemyUnitOfWork
from qna.application.ports import PageKey
from qna.domain.errors import LLMTimeout
from qna.domain.model import QnA, Status, normalise_for_cache

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


def test_find_answered_matches_normalised_question_and_model(uow: SqlAlchemyUnitOfWork) -> None:
    old = QnA.ask("What is 2+2?", model="m", now=T0 - timedelta(hours=2))
    old.record_answer(
        answer="3", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    recent = QnA.ask("what  is 2+2?", model="m", now=T0)
    recent.record_answer(
        answer="4", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    other_model = QnA.ask("What is 2+2?", model="other", now=T0 + timedelta(seconds=1))
    other_model.record_answer(
        answer="5", model="other", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    failed = QnA.ask("What is 2+2?", model="m", now=T0 + timedelta(seconds=2))
    failed.record_failure(LLMTimeout("slow"), latency_ms=1, now=T0)
    store(uow, old, recent, other_model, failed)

    key = normalise_for_cache("WHAT IS 2+2?")
    with uow:
        hit = uow.qnas.find_answered(normalised=key, model="m", since=T0 - timedelta(hours=1))
        miss = uow.qnas.find_answered(normalised=key, model="m", since=T0 + timedelta(seconds=1))
        nothing = uow.qnas.find_answered(
            normalised="other", model="m", since=T0 - timedelta(days=1)
        )

    assert hit is not None and hit.id == recent.id
    assert miss is None
    assert nothing is None


def test_list_pending_finds_old_pending_only(uow: SqlAlchemyUnitOfWork) -> None:
    stale = QnA.ask("stale", model="m", now=T0 - timedelta(hours=1))
    fresh = QnA.ask("fresh", model="m", now=T0)
    done = QnA.ask("done", model="m", now=T0 - timedelta(hours=1))
    done.record_answer(
        answer="a", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=T0
    )
    store(uow, stale, fresh, done)

    with uow:
        pending = uow.qnas.list_pending(created_before=T0 - timedelta(minutes=5), limit=10)

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
