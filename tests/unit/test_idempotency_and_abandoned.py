"""Idempotency keys and abandoned asks, over the in-memory fakes."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

import pytest

from qna.application.use_cases import AskQuestion, GetQnA, ListQnA, ReapAbandoned
from qna.domain.errors import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    LLMUnavailable,
    StorageUnavailable,
)
from qna.domain.model import Abandonment, QnA, Status
from tests.fakes import FakeClock, FakeLLM, FakeRepository, FakeTimer, FakeUnitOfWorkFactory


class Sleeper:
    """A sleep that advances the fake timer instead of waiting."""

    def __init__(self, timer: FakeTimer) -> None:
        self.timer = timer
        self.calls = 0
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls += 1
        self.waits.append(seconds)
        self.timer.advance(seconds)


@pytest.fixture
def uow() -> FakeUnitOfWorkFactory:
    return FakeUnitOfWorkFactory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_ask(
    uow: FakeUnitOfWorkFactory, llm: FakeLLM, clock: FakeClock, timer: FakeTimer | None = None
) -> AskQuestion:
    timer = timer or FakeTimer()
    return AskQuestion(
        uow,
        llm,
        clock=clock,
        timer=timer,
        sleep=Sleeper(timer),
        idempotency_ttl=timedelta(hours=1),
        in_flight_wait=timedelta(seconds=2),
    )


def test_the_same_key_and_question_returns_the_first_record_without_a_second_llm_call(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    llm = FakeLLM("Paris.")
    ask = make_ask(uow, llm, clock)

    first = ask("Capital of France?", idempotency_key="k1")
    again = ask("  Capital of France?  ", idempotency_key="k1")

    assert llm.calls == 1
    assert again.id == first.id
    assert again.answer == "Paris."
    assert len(uow.committed_records()) == 1


def test_ask_says_which_answer_is_a_replay(uow: FakeUnitOfWorkFactory, clock: FakeClock) -> None:
    llm = FakeLLM("Paris.")
    ask = make_ask(uow, llm, clock)

    first = ask.ask("Capital of France?", idempotency_key="k1")
    again = ask.ask("Capital of France?", idempotency_key="k1")
    unkeyed = ask.ask("Capital of France?")

    assert (first.replayed, again.replayed, unkeyed.replayed) == (False, True, False)
    assert again.qna.id == first.qna.id != unkeyed.qna.id
    assert llm.calls == 2


def test_the_same_key_with_another_question_is_refused(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    llm = FakeLLM()
    ask = make_ask(uow, llm, clock)
    ask("One question", idempotency_key="k1")

    with pytest.raises(IdempotencyKeyReused):
        ask("Another question", idempotency_key="k1")
    with pytest.raises(IdempotencyKeyReused):
        ask("One question", idempotency_key="k1", fresh=True)

    assert llm.calls == 1
    assert len(uow.committed_records()) == 1


def test_different_keys_are_different_asks(uow: FakeUnitOfWorkFactory, clock: FakeClock) -> None:
    llm = FakeLLM()
    ask = make_ask(uow, llm, clock)

    a = ask("Same question", idempotency_key="a")
    b = ask("Same question", idempotency_key="b")

    assert a.id != b.id
    assert llm.calls == 2


def test_an_expired_key_can_be_used_again(uow: FakeUnitOfWorkFactory, clock: FakeClock) -> None:
    llm = FakeLLM()
    ask = make_ask(uow, llm, clock)
    first = ask("Old question", idempotency_key="k")
    clock.advance(timedelta(hours=2))

    second = ask("New question", idempotency_key="k")

    assert second.id != first.id
    assert llm.calls == 2
    assert uow.committed_records() and {q.idempotency_key for q in uow.committed_records()} == {
        None,
        "k",
    }


def test_a_failed_ask_frees_its_key_for_a_real_retry(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    llm = FakeLLM(script=[LLMUnavailable("down"), "Answer after retry."])
    ask = make_ask(uow, llm, clock)
    with pytest.raises(LLMUnavailable):
        ask("Flaky?", idempotency_key="k")

    retried = ask("Flaky?", idempotency_key="k")

    assert retried.status is Status.ANSWERED
    assert llm.calls == 2
    statuses = sorted(q.status.value for q in uow.committed_records())
    assert statuses == ["answered", "failed"]  # the failure stays in the history


def test_a_key_still_in_flight_waits_then_gives_409(
    uow: FakeUnitOfWorkFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight = QnA.ask("Slow?", model="fake-model", now=clock())
    in_flight.idempotency_key = "k"
    # Same fingerprint as the request below: a twin of the first request.
    in_flight.request_fingerprint = _fingerprint_of("Slow?")
    uow.seed(in_flight)
    inserts = []
    add = FakeRepository.add
    monkeypatch.setattr(
        FakeRepository, "add", lambda repo, qna: (inserts.append(qna.id), add(repo, qna))[1]
    )
    timer = FakeTimer()
    sleeper = Sleeper(timer)
    ask = AskQuestion(
        uow,
        FakeLLM(),
        clock=clock,
        timer=timer,
        sleep=sleeper,
        in_flight_wait=timedelta(seconds=30),
    )

    with pytest.raises(IdempotencyKeyInFlight):
        ask("Slow?", idempotency_key="k")

    # It looked for the whole wait, then gave up: soon at first, then less and less
    # often, up to once a second; not every 50 ms (600 reads in the 30 s).
    assert sum(sleeper.waits) == pytest.approx(30)
    assert sleeper.waits[0] == AskQuestion.POLL_S
    assert sleeper.waits[:-1] == sorted(sleeper.waits[:-1])
    assert max(sleeper.waits) == AskQuestion.MAX_POLL_S
    assert sleeper.calls < 40
    assert len(uow.committed_records()) == 1
    # By reading: one insert found the key held, and none was tried again (on
    # PostgreSQL each would leave a dead row and spend a transaction id).
    assert len(inserts) == 1


def test_a_retry_that_waited_for_a_failing_ask_is_stamped_when_it_asks(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    # Stamped when its wait began, its record counted as abandoned while its own
    # LLM call ran within the deadline, and a further retry asked the LLM again.
    holder = QnA.ask("Slow?", model="fake-model", now=clock())
    holder.idempotency_key, holder.request_fingerprint = "k", _fingerprint_of("Slow?")
    uow.seed(holder)
    timer = FakeTimer()

    def wait_while_the_holder_runs(seconds: float) -> None:
        timer.advance(seconds)
        clock.advance(timedelta(seconds=seconds))
        if clock() - holder.created_at >= timedelta(seconds=88):
            with uow() as other:
                holder.record_failure(LLMUnavailable("down"), latency_ms=1, now=clock())
                other.qnas.save(holder)
                other.commit()

    seen_while_asking = []

    def answer_slowly(_question: str) -> None:
        clock.advance(timedelta(seconds=95))  # within its 120 s deadline
        with uow() as reader:
            mine = reader.qnas.get_by_idempotency_key("k")
        assert mine is not None
        reading = GetQnA(uow, abandon_after=timedelta(seconds=180), clock=clock)
        seen_while_asking.append(reading(mine.id).status)

    retry = AskQuestion(
        uow,
        FakeLLM(on_call=answer_slowly),
        clock=clock,
        timer=timer,
        sleep=wait_while_the_holder_runs,
        in_flight_wait=timedelta(seconds=90),
        llm_deadline=timedelta(seconds=120),
        abandon_after=timedelta(seconds=180),
    )
    asked_at = holder.created_at + timedelta(seconds=88)

    answered = retry("Slow?", idempotency_key="k")

    assert seen_while_asking == [Status.PENDING]
    assert answered.status is Status.ANSWERED
    assert answered.created_at >= asked_at


@pytest.mark.parametrize(
    ("asking_for_s", "in_flight_wait_s", "retry_after"),
    [
        # Over 120 s after it began, 90 s from now; a retry waits 10 s of that itself.
        pytest.param(30, 10, 80, id="before-its-deadline"),
        # Past its deadline, not yet abandoned: whatever it comes to, a retry learns.
        pytest.param(125, 1, 0, id="past-its-deadline"),
    ],
)
def test_a_409_says_when_the_asks_deadline_leaves_only_a_retrys_own_wait(
    uow: FakeUnitOfWorkFactory,
    clock: FakeClock,
    asking_for_s: int,
    in_flight_wait_s: int,
    retry_after: float,
) -> None:
    _seed_holder(uow, now=clock(), question="Slow?")
    clock.advance(timedelta(seconds=asking_for_s))  # the first request is still asking
    ask = _retrying(uow, clock, in_flight_wait=timedelta(seconds=in_flight_wait_s))

    with pytest.raises(IdempotencyKeyInFlight) as raised:
        ask("Slow?", idempotency_key="k")

    assert raised.value.retry_after == retry_after


def test_a_409_counts_on_the_holders_own_deadline(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    # Asked by a server allowed 600 s an ask; retried at one allowed 120 s, 100 s in:
    # the holder may go on for 500 s more, not 20.
    margin = timedelta(seconds=60)
    abandon_after = timedelta(seconds=600) + margin
    _seed_holder(uow, now=clock(), question="Slow?", abandon_after=abandon_after)
    clock.advance(timedelta(seconds=100))
    ask = _retrying(
        uow,
        clock,
        in_flight_wait=timedelta(seconds=10),
        abandon_after=timedelta(seconds=120) + margin,
    )

    with pytest.raises(IdempotencyKeyInFlight) as raised:
        ask("Slow?", idempotency_key="k")

    assert raised.value.retry_after == 500 - 10


def _retrying(
    uow: FakeUnitOfWorkFactory, clock: FakeClock, *, in_flight_wait: timedelta, **options: Any
) -> AskQuestion:
    """The ask of a retry, in a process that allows asks 120 s, on a fake timer."""
    timer = FakeTimer()
    return AskQuestion(
        uow,
        FakeLLM(),
        clock=clock,
        timer=timer,
        sleep=Sleeper(timer),
        in_flight_wait=in_flight_wait,
        llm_deadline=timedelta(seconds=120),
        **options,
    )


def _fingerprint_of(question: str) -> str | None:
    uow = FakeUnitOfWorkFactory()
    probe = AskQuestion(uow, FakeLLM())
    probe(question, idempotency_key="probe")
    return uow.committed_records()[0].request_fingerprint


def test_abandoned_pending_records_are_reported_failed_when_read(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    stale = QnA.ask("Asked by a process that died", model="m", now=clock())
    fresh = QnA.ask("Still being answered", model="m", now=clock() + timedelta(minutes=9))
    uow.seed(stale, fresh)
    clock.advance(timedelta(minutes=10))

    got = GetQnA(uow, abandon_after=timedelta(minutes=5), clock=clock)(stale.id)
    page = ListQnA(uow, abandon_after=timedelta(minutes=5), clock=clock)()

    assert got.status is Status.FAILED
    assert got.error_kind == "abandoned"
    assert {q.id: q.status for q in page.items} == {
        stale.id: Status.FAILED,
        fresh.id: Status.PENDING,
    }
    stored = {q.id: q.status for q in uow.committed_records()}
    assert stored[stale.id] is Status.FAILED


def test_an_ask_stores_when_it_counts_as_abandoned_by_its_own_deadline(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    ask = AskQuestion(uow, FakeLLM(), clock=clock, abandon_after=timedelta(minutes=11))

    asked = ask("How long may this take?")

    [stored] = uow.committed_records()
    assert stored.abandon_at == asked.created_at + timedelta(minutes=11)


def test_readers_judge_a_pending_record_by_its_askers_deadline_not_their_own(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    # Asked by a server allowed 10 minutes an ask, read by a process allowed 5 (a
    # `qna history` without the server's settings): still being answered at 7.
    asked = QnA.ask("Slow?", model="m", now=clock(), abandon_after=timedelta(minutes=10))
    legacy = QnA.ask("Stored before abandon_at was kept", model="m", now=clock())
    uow.seed(asked, legacy)
    clock.advance(timedelta(minutes=7))
    readers = {"abandon_after": timedelta(minutes=5), "clock": clock}

    assert ReapAbandoned(uow, **readers)() == 1  # the legacy one, by the reader's own 5
    assert GetQnA(uow, **readers)(asked.id).status is Status.PENDING
    assert [q.id for q in ListQnA(uow, **readers)(status="pending").items] == [asked.id]
    assert [q.id for q in ListQnA(uow, **readers)(status="failed").items] == [legacy.id]
    clock.advance(timedelta(minutes=4))
    assert GetQnA(uow, **readers)(asked.id).error_kind == "abandoned"
    assert {q.status for q in uow.committed_records()} == {Status.FAILED}


def test_a_database_that_takes_no_writes_still_reports_abandoned_records_when_read(
    uow: FakeUnitOfWorkFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A standby, a read-only file: closing the abandoned is housekeeping, and the
    # read it came with failed for it.
    stale = QnA.ask("Asked by a process that died", model="m", now=clock())
    also_stale = QnA.ask("So was this one", model="m", now=clock() + timedelta(seconds=1))
    uow.seed(stale, also_stale)
    clock.advance(timedelta(minutes=10))

    def read_only(_repository: FakeRepository, _qna: QnA) -> bool:
        raise StorageUnavailable("cannot execute UPDATE in a read-only transaction")

    monkeypatch.setattr(FakeRepository, "close_pending", read_only)

    got = GetQnA(uow, abandon_after=timedelta(minutes=5), clock=clock)(stale.id)
    page = ListQnA(uow, abandon_after=timedelta(minutes=5), clock=clock)()

    assert (got.status, got.error_kind) == (Status.FAILED, "abandoned")
    assert [(q.status, q.error_kind) for q in page.items] == [(Status.FAILED, "abandoned")] * 2
    assert {q.status for q in uow.committed_records()} == {Status.PENDING}


def test_reaper_closes_every_abandoned_record(uow: FakeUnitOfWorkFactory, clock: FakeClock) -> None:
    stale = [QnA.ask(f"q{i}", model="m", now=clock()) for i in range(7)]
    recent = QnA.ask("recent", model="m", now=clock() + timedelta(minutes=8))
    uow.seed(*stale, recent)
    clock.advance(timedelta(minutes=10))
    reap = ReapAbandoned(uow, abandon_after=timedelta(minutes=5), clock=clock)
    reap.BATCH = 3

    closed = reap()

    assert closed == 7
    statuses = {q.id: q.status for q in uow.committed_records()}
    assert all(statuses[q.id] is Status.FAILED for q in stale)
    assert statuses[recent.id] is Status.PENDING


def test_a_keyed_retry_of_a_failed_ask_may_be_answered_from_the_cache(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    # The keyed ask fails; someone else's ask fills the cache; the keyed retry first
    # finds the answer in the cache, then loses its insert to the failed holder of its
    # key, frees the key and tries again — from a clean record, not the cached one.
    llm = FakeLLM(script=[LLMUnavailable("down"), "Paris."])
    ask = AskQuestion(
        uow,
        llm,
        clock=clock,
        timer=FakeTimer(),
        cache_ttl=timedelta(hours=1),
        idempotency_ttl=timedelta(hours=1),
    )
    with pytest.raises(LLMUnavailable):
        ask("Capital of France?", idempotency_key="k1")
    cached_source = ask("Capital of France?")

    retried = ask("Capital of France?", idempotency_key="k1")

    assert retried.status is Status.ANSWERED
    assert retried.source_id == cached_source.id
    assert retried.idempotency_key == "k1"
    assert llm.calls == 2


def test_closing_abandoned_records_keeps_an_answer_that_landed_since_they_were_read(
    uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    from qna.application.use_cases import _close_abandoned

    old = clock() - timedelta(hours=2)
    lost, late = QnA.ask("Lost?", model="m", now=old), QnA.ask("Late?", model="m", now=old)
    with uow() as unit:
        unit.qnas.add(lost)
        unit.qnas.add(late)
        unit.commit()
    with uow() as unit:
        read = [unit.qnas.get(lost.id), unit.qnas.get(late.id)]
    late.record_answer(
        answer="Here.", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=9, now=clock()
    )
    with uow() as unit:
        unit.qnas.save(late)
        unit.commit()

    records = [r for r in read if r is not None]
    with uow() as unit:
        closed = _close_abandoned(unit, records, Abandonment(clock(), timedelta(minutes=5)))

    assert closed == 1
    assert [(r.status, r.answer) for r in records] == [
        (Status.FAILED, None),
        (Status.ANSWERED, "Here."),
    ]
    stored = {r.id: r.status for r in uow.committed_records()}
    assert stored == {lost.id: Status.FAILED, late.id: Status.ANSWERED}


def _seed_holder(
    uow: FakeUnitOfWorkFactory,
    *,
    now: datetime,
    question: str,
    abandon_after: timedelta | None = None,
) -> QnA:
    """A record holding key "k", asked at `now` with `question`, by an asker that
    stamped its deadline (`abandon_after`) or one from before 0003 (None)."""
    holder = QnA.ask(question, model="fake-model", now=now, abandon_after=abandon_after)
    holder.idempotency_key, holder.request_fingerprint = "k", _fingerprint_of(question)
    uow.seed(holder)
    return holder


def test_a_retry_that_finds_the_abandoned_holders_answer_landed_replays_it(
    uow: FakeUnitOfWorkFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The holder looked abandoned (pending far past any deadline), but its answer
    # lands just as the retry closes it: the close finds it no longer pending, and
    # the retry must replay that answer, not free the key and pay the LLM again.
    holder = _seed_holder(uow, now=clock() - timedelta(minutes=30), question="Late?")

    def answer_lands_first(repository: FakeRepository, qna: QnA) -> bool:
        landed = copy.deepcopy(holder)
        landed.record_answer(
            answer="Late, but here.",
            model="fake-model",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=9,
            now=clock(),
        )
        with uow() as asker:
            asker.qnas.save(landed)
            asker.commit()
        return False

    monkeypatch.setattr(FakeRepository, "close_pending", answer_lands_first)
    llm = FakeLLM("Asked twice.")

    asked = make_ask(uow, llm, clock).ask("Late?", idempotency_key="k")

    assert llm.calls == 0
    assert asked.replayed
    assert (asked.qna.id, asked.qna.answer) == (holder.id, "Late, but here.")


def test_a_key_released_between_the_insert_and_the_read_is_tried_again(
    uow: FakeUnitOfWorkFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The insert lost the key to a holder that let it go before the read that
    # follows: nothing to wait for or replay, the key is there to take.
    holder = _seed_holder(uow, now=clock(), question="Again?")
    read = FakeRepository.get_by_idempotency_key
    reads = []

    def released_once(repository: FakeRepository, key: str) -> QnA | None:
        reads.append(key)
        # The first read is the fake's own insert finding the key held; the second,
        # the use case's, finds it gone.
        if len(reads) == 2:
            with uow() as other:
                other.qnas.release_idempotency_key(holder.id)
                other.commit()
            return None
        return read(repository, key)

    monkeypatch.setattr(FakeRepository, "get_by_idempotency_key", released_once)
    llm = FakeLLM("Taken.")

    asked = make_ask(uow, llm, clock).ask("Again?", idempotency_key="k")

    assert llm.calls == 1
    assert not asked.replayed
    assert asked.qna.id != holder.id and asked.qna.answer == "Taken."
    assert asked.qna.idempotency_key == "k"
    assert len(reads) >= 3  # the first insert, the read that found none, the second insert
