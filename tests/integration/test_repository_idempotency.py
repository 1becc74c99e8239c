"""Idempotency keys in real databases: the unique constraint decides who asks the LLM.

The repository tests run on SQLite and PostgreSQL (the `database_url` fixture); the
race runs on PostgreSQL, where concurrent writers really are concurrent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Engine, text

from qna.adapters.sqlalchemy.repository import SqlAlchemyUnitOfWork
from qna.application.ports import DuplicateIdempotencyKey
from qna.config import Settings
from qna.container import Container, create_container, shutdown
from qna.domain.errors import IdempotencyKeyInFlight, IdempotencyKeyReused, LLMRefused
from qna.domain.model import QnA, Status
from tests.support.fake_openai import FakeOpenAI
from tests.support.fake_openai import Status as FakeStatus

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
KEY = "client-1:order-42"
QUESTION = "What is the capital of France?"
RACERS = 20


@pytest.fixture
def uow(engine: Engine) -> SqlAlchemyUnitOfWork:
    return SqlAlchemyUnitOfWork(engine)


def keyed(question: str = QUESTION, key: str = KEY, now: datetime = T0) -> QnA:
    qna = QnA.ask(question, model="m", now=now)
    qna.idempotency_key = key
    qna.request_fingerprint = "f" * 64
    return qna


def rows_with_key(engine: Engine, key: str) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        result = connection.execute(
            text("SELECT id, status FROM qn_a WHERE idempotency_key = :key"), {"key": key}
        )
        return [dict(row._mapping) for row in result]


def count_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM qn_a")).scalar_one())


# -- the repository ---------------------------------------------------------------------------


def test_a_second_record_with_the_same_key_is_refused_and_one_row_stays(
    uow: SqlAlchemyUnitOfWork, engine: Engine
) -> None:
    first = keyed()
    with uow:
        uow.qnas.add(first)
        uow.commit()

    with pytest.raises(DuplicateIdempotencyKey), uow:
        uow.qnas.add(keyed("Another question"))
        uow.commit()

    rows = rows_with_key(engine, KEY)
    assert [UUID(str(row["id"])) for row in rows] == [first.id]
    assert count_rows(engine) == 1


def test_the_same_key_twice_in_one_transaction_is_refused(
    uow: SqlAlchemyUnitOfWork, engine: Engine
) -> None:
    with pytest.raises(DuplicateIdempotencyKey), uow:
        uow.qnas.add(keyed())
        uow.qnas.add(keyed())
        uow.commit()

    assert count_rows(engine) == 0  # rolled back together


def test_records_without_a_key_never_collide(uow: SqlAlchemyUnitOfWork, engine: Engine) -> None:
    with uow:
        for _ in range(3):
            uow.qnas.add(QnA.ask(QUESTION, model="m", now=T0))
        uow.commit()

    assert count_rows(engine) == 3


def test_get_by_idempotency_key(uow: SqlAlchemyUnitOfWork) -> None:
    first = keyed()
    with uow:
        uow.qnas.add(first)
        uow.commit()

    with uow:
        found = uow.qnas.get_by_idempotency_key(KEY)
        missing = uow.qnas.get_by_idempotency_key("client-1:other")
        prefix = uow.qnas.get_by_idempotency_key("client-1")

    assert found is not None
    assert found.id == first.id
    assert found.idempotency_key == KEY
    assert found.request_fingerprint == first.request_fingerprint
    assert missing is None
    assert prefix is None


def test_a_released_key_can_be_taken_again_and_the_old_record_stays(
    uow: SqlAlchemyUnitOfWork, engine: Engine
) -> None:
    first = keyed()
    with uow:
        uow.qnas.add(first)
        uow.commit()

    with uow:
        uow.qnas.release_idempotency_key(first.id)
        uow.commit()
    with uow:
        assert uow.qnas.get_by_idempotency_key(KEY) is None
        kept = uow.qnas.get(first.id)
    assert kept is not None
    assert kept.idempotency_key is None

    second = keyed(now=T0 + timedelta(seconds=1))
    with uow:
        uow.qnas.add(second)
        uow.commit()

    assert [UUID(str(row["id"])) for row in rows_with_key(engine, KEY)] == [second.id]
    assert count_rows(engine) == 2


def test_a_late_save_writes_the_outcome_but_never_takes_a_released_key_back(
    uow: SqlAlchemyUnitOfWork, engine: Engine
) -> None:
    # The first ask outlived its deadline: its key was released and taken by a retry.
    first = keyed()
    with uow:
        uow.qnas.add(first)
        uow.commit()
    with uow:
        uow.qnas.release_idempotency_key(first.id)
        uow.commit()
    second = keyed(now=T0 + timedelta(seconds=1))
    with uow:
        uow.qnas.add(second)
        uow.commit()

    # Then the first one's answer arrives, from a copy that still has the key.
    assert first.idempotency_key == KEY
    first.record_answer(
        answer="Late.", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=9, now=T0
    )
    with uow:
        uow.qnas.save(first)
        uow.commit()

    with uow:
        saved = uow.qnas.get(first.id)
    assert saved is not None
    assert (saved.status, saved.answer, saved.idempotency_key) == (Status.ANSWERED, "Late.", None)
    assert [UUID(str(row["id"])) for row in rows_with_key(engine, KEY)] == [second.id]


def test_a_release_that_is_not_committed_keeps_the_key(uow: SqlAlchemyUnitOfWork) -> None:
    first = keyed()
    with uow:
        uow.qnas.add(first)
        uow.commit()

    with uow:
        uow.qnas.release_idempotency_key(first.id)  # no commit: rolled back

    with pytest.raises(DuplicateIdempotencyKey), uow:
        uow.qnas.add(keyed())


# -- AskQuestion over the real unit of work ---------------------------------------------------


ContainerFactory = Callable[..., Container]


@pytest.fixture
def make_container(fake_openai: FakeOpenAI) -> Iterator[ContainerFactory]:
    containers: list[Container] = []

    def build(database_url: str, **overrides: Any) -> Container:
        settings = Settings(
            _env_file=None,
            database_url=database_url,
            openai_base_url=fake_openai.base_url,
            model="gpt-test",
            llm_max_attempts=1,
            cache_ttl_s=0,
            **overrides,
        )
        container = create_container(settings)
        containers.append(container)
        return container

    yield build
    for container in containers:
        shutdown(container)


def test_the_same_key_twice_asks_the_llm_once(
    make_container: ContainerFactory, database_url: str, fake_openai: FakeOpenAI, engine: Engine
) -> None:
    ask = make_container(database_url).ask_question()

    first = ask(QUESTION, idempotency_key=KEY)
    again = ask(f"  {QUESTION}\r\n", idempotency_key=KEY)  # the same after parsing

    assert fake_openai.calls == 1
    assert again.id == first.id
    assert again.status is Status.ANSWERED
    assert again.answer == first.answer
    assert len(rows_with_key(engine, KEY)) == 1
    assert count_rows(engine) == 1


def test_the_same_key_with_another_question_is_refused_without_asking(
    make_container: ContainerFactory, database_url: str, fake_openai: FakeOpenAI, engine: Engine
) -> None:
    ask = make_container(database_url).ask_question()
    ask(QUESTION, idempotency_key=KEY)

    with pytest.raises(IdempotencyKeyReused):
        ask("Another question", idempotency_key=KEY)

    assert fake_openai.calls == 1
    assert count_rows(engine) == 1


def test_a_failed_ask_frees_its_key_and_the_retry_asks_again(
    make_container: ContainerFactory, database_url: str, fake_openai: FakeOpenAI, engine: Engine
) -> None:
    ask = make_container(database_url).ask_question()
    fake_openai.script(FakeStatus(400))
    with pytest.raises(LLMRefused) as failed:
        ask(QUESTION, idempotency_key=KEY)
    failed_id = failed.value.qna_id

    retried = ask(QUESTION, idempotency_key=KEY)

    assert fake_openai.calls == 2
    assert retried.status is Status.ANSWERED
    assert retried.id != failed_id
    # Both asks stay in the history; only the answered one holds the key.
    assert [UUID(str(row["id"])) for row in rows_with_key(engine, KEY)] == [retried.id]
    assert count_rows(engine) == 2


def race(ask: Callable[..., QnA], racers: int = RACERS) -> list[QnA | BaseException]:
    """Start `racers` asks with one key at the same instant; each one's record or error."""
    barrier = threading.Barrier(racers)

    def one(_: int) -> QnA | BaseException:
        barrier.wait(timeout=10)
        try:
            return ask(QUESTION, idempotency_key=KEY)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=racers) as pool:
        return list(pool.map(one, range(racers)))


@pytest.mark.postgres
def test_racing_threads_with_one_key_ask_the_llm_once(
    make_container: ContainerFactory, postgres_url: str, fake_openai: FakeOpenAI
) -> None:
    container = make_container(postgres_url, db_pool_size=RACERS)
    with container.engine().begin() as connection:
        connection.execute(text("DELETE FROM qn_a"))
    fake_openai.latency = 0.3
    ask = container.ask_question()

    outcomes = race(ask)

    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []
    records = [o for o in outcomes if isinstance(o, QnA)]
    assert fake_openai.calls == 1
    assert len({record.id for record in records}) == 1
    assert all(record.status is Status.ANSWERED for record in records)
    assert len(rows_with_key(container.engine(), KEY)) == 1
    assert count_rows(container.engine()) == 1


@pytest.mark.postgres
def test_racing_threads_that_will_not_wait_are_told_the_key_is_in_flight(
    make_container: ContainerFactory, postgres_url: str, fake_openai: FakeOpenAI
) -> None:
    container = make_container(postgres_url, db_pool_size=RACERS, idempotency_wait_s=0)
    with container.engine().begin() as connection:
        connection.execute(text("DELETE FROM qn_a"))
    # Longer than the others: a racer that arrives after the answer gets it, not 409.
    fake_openai.latency = 1.0
    ask = container.ask_question()

    outcomes = race(ask)

    records = [o for o in outcomes if isinstance(o, QnA)]
    in_flight = [o for o in outcomes if isinstance(o, IdempotencyKeyInFlight)]
    assert len(records) + len(in_flight) == RACERS, outcomes
    assert fake_openai.calls == 1
    assert len({record.id for record in records}) == 1
    assert all(record.status is Status.ANSWERED for record in records)
    assert in_flight  # nobody waited for the one that asked
    assert count_rows(container.engine()) == 1
