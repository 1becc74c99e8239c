"""AskQuestion, GetQnA and ListQnA against in-memory fakes."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from qna.application import AskQuestion, GetQnA, InvalidArgument, InvalidCursor, ListQnA
from qna.application.ports import Completion
from qna.application.use_cases import AmbiguousId, FindQnA, Page, encode_cursor
from qna.domain import (
    InvalidQuestion,
    LLMError,
    LLMRateLimited,
    LLMUnavailable,
    NotFound,
    QnA,
    Status,
)
from qna.domain.errors import LLM_ERRORS, LLMTimeout, OutcomeNotStored, StorageUnavailable
from tests.fakes import START, FakeClock, FakeLLM, FakeTimer, FakeUnitOfWorkFactory

TTL = timedelta(hours=1)
DATABASE_DOWN = StorageUnavailable("The database is unavailable: connection refused")


class World:
    """One store, one clock, one timer; use cases built over them on demand."""

    def __init__(self) -> None:
        self.uow = FakeUnitOfWorkFactory()
        self.clock = FakeClock()
        self.timer = FakeTimer()

    def ask(self, llm: FakeLLM, *, cache_ttl: timedelta | None = None) -> AskQuestion:
        return AskQuestion(self.uow, llm, cache_ttl=cache_ttl, clock=self.clock, timer=self.timer)

    def stored(self, qna_id: UUID | None) -> QnA:
        assert qna_id is not None
        with self.uow() as uow:
            qna = uow.qnas.get(qna_id)
        assert qna is not None, f"QnA {qna_id} was not committed"
        return qna


@pytest.fixture
def world() -> World:
    return World()


def _thinking_takes(world: World, seconds: float) -> FakeLLM:
    """An LLM whose call moves both the timer and the wall clock by `seconds`."""

    def think(_question: str) -> None:
        world.timer.advance(seconds)
        world.clock.advance(timedelta(seconds=seconds))

    return FakeLLM(
        "Forty-two.",
        model="gpt-test",
        answered_by="gpt-test-2025-01-01",
        prompt_tokens=13,
        completion_tokens=4,
        on_call=think,
    )


# --- AskQuestion: the LLM answers ----------------------------------------------------


def test_an_answer_is_stored_with_model_tokens_and_exact_latency(world: World) -> None:
    llm = _thinking_takes(world, 1.25)

    qna = world.ask(llm)("  What is six times seven?\n")

    assert llm.questions == ["What is six times seven?"]
    assert qna.status is Status.ANSWERED
    assert qna.question == "What is six times seven?"
    assert qna.answer == "Forty-two."
    assert qna.model == "gpt-test"
    assert qna.response_model == "gpt-test-2025-01-01"
    assert (qna.prompt_tokens, qna.completion_tokens) == (13, 4)
    assert qna.latency_ms == 1250
    assert qna.created_at == START
    assert qna.answered_at == START + timedelta(seconds=1.25)
    assert qna.source_id is None
    assert world.stored(qna.id) == qna


def test_the_question_is_committed_before_the_llm_is_called(world: World) -> None:
    seen: list[QnA] = []

    def look_from_another_transaction(question: str) -> None:
        with world.uow() as uow:
            seen.extend(uow.qnas.list(limit=10))

    llm = FakeLLM(on_call=look_from_another_transaction)
    world.uow.watch(llm)

    qna = world.ask(llm)("Is it stored yet?")

    assert len(seen) == 1
    assert seen[0].id == qna.id
    assert seen[0].status is Status.PENDING
    assert seen[0].question == "Is it stored yet?"
    assert seen[0].answer is None


def test_no_transaction_is_open_while_the_llm_thinks(world: World) -> None:
    llm = FakeLLM()
    world.uow.watch(llm)

    world.ask(llm)("Anything open?")

    assert world.uow.open_during_llm_calls == [0]
    # One short unit of work before the call (the insert), one after (the update),
    # each a single autocommit write; none left open.
    assert [u.autocommit for u in world.uow.units] == [True, True]
    assert world.uow.committed_records()[0].status is Status.ANSWERED
    assert world.uow.max_open == 1
    assert world.uow.open_count == 0


def test_the_answer_is_stored_as_a_single_record(world: World) -> None:
    qna = world.ask(FakeLLM())("One record please")

    assert [r.id for r in world.uow.committed_records()] == [qna.id]


def test_an_outcome_the_database_refuses_once_is_saved_by_a_second_try(world: World) -> None:
    llm = FakeLLM("Forty-two.", on_call=lambda _q: world.uow.fail_next(DATABASE_DOWN))

    qna = world.ask(llm)("Saved after all?")

    assert llm.questions == ["Saved after all?"]  # asked once, not again
    assert world.stored(qna.id).status is Status.ANSWERED
    assert world.stored(qna.id).answer == "Forty-two."


def test_an_outcome_the_database_refuses_twice_leaves_the_record_pending(world: World) -> None:
    llm = FakeLLM("Forty-two.", on_call=lambda _q: world.uow.fail_next(DATABASE_DOWN, times=2))

    with pytest.raises(OutcomeNotStored) as raised:
        world.ask(llm)("Lost?")

    [record] = world.uow.committed_records()
    assert record.status is Status.PENDING  # closed as abandoned later, like a crash
    assert len(llm.questions) == 1
    # Not lost to the asker, who paid for it: the answer comes with the error.
    assert isinstance(raised.value, StorageUnavailable)
    assert raised.value.message == DATABASE_DOWN.message
    assert raised.value.retryable
    assert raised.value.qna.id == record.id
    assert raised.value.qna.status is Status.ANSWERED
    assert raised.value.qna.answer == "Forty-two."


def test_a_failure_the_database_refuses_twice_comes_with_the_error(world: World) -> None:
    llm = FakeLLM(
        script=[LLMRateLimited("slow down")],
        on_call=lambda _q: world.uow.fail_next(DATABASE_DOWN, times=2),
    )

    with pytest.raises(OutcomeNotStored) as raised:
        world.ask(llm)("Lost?")

    assert raised.value.qna.status is Status.FAILED
    assert raised.value.qna.error_kind == "llm_rate_limited"
    assert world.uow.committed_records()[0].status is Status.PENDING
    # The LLM's error itself, not only its trace in the record: a caller reports it.
    assert isinstance(raised.value.llm_error, LLMRateLimited)
    assert raised.value.llm_error.message == "slow down"


def test_an_answer_the_database_refuses_twice_carries_no_llm_error(world: World) -> None:
    llm = FakeLLM("Forty-two.", on_call=lambda _q: world.uow.fail_next(DATABASE_DOWN, times=2))

    with pytest.raises(OutcomeNotStored) as raised:
        world.ask(llm)("Lost?")

    assert raised.value.llm_error is None


def test_completion_from_a_script_is_returned_verbatim(world: World) -> None:
    scripted = Completion(
        text="scripted", model="other", prompt_tokens=None, finish_reason="length"
    )

    qna = world.ask(FakeLLM(script=[scripted]))("Script?")

    assert (
        qna.answer,
        qna.response_model,
        qna.prompt_tokens,
        qna.completion_tokens,
        qna.finish_reason,
    ) == ("scripted", "other", None, None, "length")
    assert world.stored(qna.id) == qna


# --- AskQuestion: the LLM fails ------------------------------------------------------


@pytest.mark.parametrize("error_class", LLM_ERRORS.values(), ids=lambda cls: cls.code)
def test_a_failure_is_stored_then_the_same_error_is_raised_with_the_record_id(
    world: World, error_class: type[LLMError]
) -> None:
    error = error_class("the provider said no")

    def fail_slowly(_question: str) -> None:
        world.timer.advance(0.25)

    llm = FakeLLM(script=[error], on_call=fail_slowly)

    with pytest.raises(error_class) as raised:
        world.ask(llm)("Will this work?")

    assert raised.value is error
    assert [u.autocommit for u in world.uow.units] == [True, True]
    stored = world.stored(raised.value.qna_id)
    assert stored.status is Status.FAILED
    assert stored.error_kind == error_class.code
    assert stored.error_message == "the provider said no"
    assert stored.latency_ms == 250
    assert stored.answer is None
    assert stored.question == "Will this work?"


def test_an_ask_interrupted_while_the_llm_thinks_is_stored_closed(world: World) -> None:
    # Ctrl-C at the command line: left pending, the record read as still being
    # answered until it was old enough to count as abandoned.
    llm = FakeLLM(script=[KeyboardInterrupt()])

    with pytest.raises(KeyboardInterrupt):
        world.ask(llm)("Will this work?")

    [stored] = world.uow.store.values()
    assert stored.status is Status.FAILED
    assert stored.error_kind == "abandoned"


def test_an_interrupted_ask_stays_interrupted_when_the_database_is_gone(world: World) -> None:
    # The interrupt was lost: the outcome the database would not take was raised
    # instead (exit 6, not 130).
    llm = FakeLLM(
        script=[KeyboardInterrupt()],
        on_call=lambda _question: world.uow.fail_next(DATABASE_DOWN, times=2),
    )

    with pytest.raises(KeyboardInterrupt):
        world.ask(llm)("Will this work?")

    [stored] = world.uow.store.values()
    assert stored.status is Status.PENDING  # read as abandoned once old enough


def test_retry_after_survives_the_reraise(world: World) -> None:
    error = LLMRateLimited("slow down", retry_after=7.5)

    with pytest.raises(LLMRateLimited) as raised:
        world.ask(FakeLLM(script=[error]))("Again?")

    assert raised.value.retry_after == 7.5
    assert raised.value.qna_id is not None


# --- AskQuestion: invalid questions --------------------------------------------------


@pytest.mark.parametrize(
    "question",
    ["", "   ", "\u3000\n", "nul\x00inside", "bell\x07", "x" * 4001],
    ids=["empty", "blank", "unicode-blank", "nul", "control", "too-long"],
)
def test_an_invalid_question_is_refused_before_anything_happens(
    world: World, question: str
) -> None:
    llm = FakeLLM()

    with pytest.raises(InvalidQuestion):
        world.ask(llm)(question)

    assert llm.calls == 0
    assert world.uow.opened == 0
    assert world.uow.committed_records() == []


def test_the_configured_maximum_length_is_used(world: World) -> None:
    llm = FakeLLM()
    ask = AskQuestion(world.uow, llm, max_question_length=10, clock=world.clock)

    assert ask("1234567890").status is Status.ANSWERED
    with pytest.raises(InvalidQuestion):
        ask("12345678901")
    assert llm.calls == 1


@pytest.mark.parametrize("fresh", ["no", "false", 0, 1, None], ids=repr)
def test_a_fresh_that_is_not_a_bool_is_refused_before_anything_happens(
    world: World, fresh: object
) -> None:
    # Before: "no" was truthy, so the cache was skipped and the LLM asked.
    llm = FakeLLM()

    with pytest.raises(InvalidArgument, match="fresh must be True or False"):
        world.ask(llm, cache_ttl=TTL).ask("What is six times seven?", fresh=fresh)  # type: ignore[arg-type]

    assert llm.calls == 0
    assert world.uow.opened == 0


# --- AskQuestion: the answer cache ---------------------------------------------------


def test_an_equal_question_is_answered_from_the_store(world: World) -> None:
    llm = FakeLLM("Paris.", model="gpt-test")
    ask = world.ask(llm, cache_ttl=TTL)
    first = ask("What is the capital of France?")
    world.clock.advance(timedelta(minutes=10))

    second = ask("  what IS the   capital of\tFRANCE?  ")

    # The cache hit needs one unit of work only (a look-up, then one insert).
    assert world.uow.opened == 3
    assert world.uow.units[-1].autocommit
    assert world.stored(second.id).source_id == first.id
    assert llm.calls == 1
    assert second.id != first.id
    assert second.status is Status.ANSWERED
    assert second.source_id == first.id
    assert second.answer == "Paris."
    assert second.model == first.model
    assert (second.prompt_tokens, second.completion_tokens, second.latency_ms) == (0, 0, 0)
    assert second.question == "what IS the   capital of\tFRANCE?"
    assert second.created_at == START + timedelta(minutes=10)
    assert world.stored(second.id) == second
    assert world.stored(first.id) == first


def test_fresh_bypasses_the_cache(world: World) -> None:
    llm = FakeLLM(script=["Old answer.", "New answer."])
    ask = world.ask(llm, cache_ttl=TTL)
    ask("Tell me the news")

    second = ask("tell me the news", fresh=True)

    assert llm.calls == 2
    assert second.answer == "New answer."
    assert second.source_id is None


def test_a_different_model_misses_the_cache(world: World) -> None:
    world.ask(FakeLLM("from a", model="model-a"), cache_ttl=TTL)("Same question")
    other = FakeLLM("from b", model="model-b")

    second = world.ask(other, cache_ttl=TTL)("Same question")

    assert other.calls == 1
    assert second.answer == "from b"
    assert second.source_id is None


def test_an_answer_older_than_the_ttl_misses_the_cache(world: World) -> None:
    llm = FakeLLM(script=["stale", "fresh"])
    ask = world.ask(llm, cache_ttl=TTL)
    ask("How old is this?")
    world.clock.advance(TTL + timedelta(microseconds=1))

    second = ask("How old is this?")

    assert llm.calls == 2
    assert second.answer == "fresh"
    assert second.source_id is None


def test_an_answer_exactly_ttl_old_still_serves(world: World) -> None:
    llm = FakeLLM(script=["only once"])
    ask = world.ask(llm, cache_ttl=TTL)
    first = ask("Borderline?")
    world.clock.advance(TTL)

    second = ask("Borderline?")

    assert llm.calls == 1
    assert second.source_id == first.id


def test_a_failed_record_never_serves_as_a_cache_source(world: World) -> None:
    llm = FakeLLM(script=[LLMUnavailable("down"), "up again"])
    ask = world.ask(llm, cache_ttl=TTL)
    with pytest.raises(LLMUnavailable):
        ask("Are you there?")

    second = ask("Are you there?")

    assert llm.calls == 2
    assert second.answer == "up again"
    assert second.source_id is None


def test_a_cached_record_is_not_itself_a_source_and_the_newest_answer_wins(
    world: World,
) -> None:
    llm = FakeLLM(script=["first", "second"])
    ask = world.ask(llm, cache_ttl=TTL)
    ask("Which one?")
    world.clock.advance(timedelta(minutes=1))
    newest_llm_answer = ask("Which one?", fresh=True)
    world.clock.advance(timedelta(minutes=1))
    ask("Which one?")  # cached, from newest_llm_answer
    world.clock.advance(timedelta(minutes=1))

    latest = ask("which one?")

    assert llm.calls == 2
    assert latest.source_id == newest_llm_answer.id
    assert latest.answer == "second"


def test_the_cache_is_off_by_default(world: World) -> None:
    llm = FakeLLM(script=["one", "two"])
    ask = world.ask(llm)
    ask("Cache me")

    second = ask("Cache me")

    assert llm.calls == 2
    assert second.answer == "two"
    assert second.source_id is None


def test_the_cache_hits_when_the_provider_reports_a_dated_model_snapshot(
    world: World,
) -> None:
    llm = FakeLLM(model="gpt-4o", answered_by="gpt-4o-2024-08-06")
    ask = world.ask(llm, cache_ttl=TTL)
    first = ask("Snapshot?")

    second = ask("Snapshot?")

    assert llm.calls == 1
    assert second.source_id == first.id


# --- GetQnA --------------------------------------------------------------------------


def test_get_returns_the_stored_record(world: World) -> None:
    asked = world.ask(FakeLLM())("Find me")
    get = GetQnA(world.uow)

    assert get(asked.id) == asked
    assert get(str(asked.id)) == asked
    assert get(str(asked.id).upper()) == asked
    # As copied from a terminal or a log line: the spaces are not part of the id.
    assert get(f"  {asked.id}\n") == asked


def test_get_of_an_unknown_id_is_not_found(world: World) -> None:
    world.ask(FakeLLM())("Something else")
    missing = uuid4()

    with pytest.raises(NotFound, match=str(missing)):
        GetQnA(world.uow)(missing)


@pytest.mark.parametrize("qna_id", ["", "nope", "' OR 1=1", "0000000g"])
def test_get_of_a_malformed_id_is_not_found(world: World, qna_id: str) -> None:
    world.ask(FakeLLM())("A record that must not match")

    with pytest.raises(NotFound) as raised:
        GetQnA(world.uow)(qna_id)

    assert raised.value.code == "not_found"
    assert raised.value.message == f"No question with id {qna_id}."


@pytest.mark.parametrize("qna_id", ["123", "00000000-0000-0000-0000", " 3F0C2C4E "])
def test_get_of_the_start_of_an_id_says_the_whole_id_is_needed(world: World, qna_id: str) -> None:
    with pytest.raises(NotFound) as raised:
        GetQnA(world.uow)(qna_id)

    assert raised.value.message == (
        f"No question with id {qna_id}: that is the start of an id at most; "
        "give the whole id (32 hex digits, hyphens or none)."
    )


# --- FindQnA: by an id or a start of one ----------------------------------------------


def _seed_ids(world: World, *ids: str) -> dict[str, QnA]:
    records = {}
    for qna_id in ids:
        records[qna_id] = QnA.ask(f"Question {qna_id}", model="m", now=world.clock())
        records[qna_id].id = UUID(qna_id)
    world.uow.seed(*records.values())
    return records


def _find(world: World, text: str) -> QnA:
    return FindQnA(world.uow, abandon_after=timedelta(minutes=5), clock=world.clock)(text)


TWINS = ("3f0c2c4e-8d3a-4f43-9a57-3f7f1f0a8b11", "3f0c2c4e-8d3a-4f43-9a57-3f7f1f0a8b12")
LONER = "3f0d0000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    "start",
    [
        "3f0d",
        "3F0D",
        "3f0d0000-",
        "3f0d0000-00",
        "3f0d000000",  # the hex digits without the hyphens
        " 3f0d0000\n",
        LONER,
        LONER.replace("-", ""),
    ],
)
def test_find_takes_an_id_or_a_start_no_other_id_has(world: World, start: str) -> None:
    records = _seed_ids(world, *TWINS, LONER, "3f0c0000-0000-4000-8000-000000000000")

    assert _find(world, start) == records[LONER]


def test_find_takes_a_start_that_only_the_last_digit_tells_apart(world: World) -> None:
    edge = "ffffffff-ffff-4fff-bfff-ffffffffffff"
    records = _seed_ids(world, *TWINS, edge)

    assert _find(world, TWINS[1]) == records[TWINS[1]]
    # The range a start covers ends at ...fff, and includes it.
    assert _find(world, "ffff") == records[edge]


@pytest.mark.parametrize("start", ["3f0c", "3f0c2c4e-8d3a-4f43-9a57-3f7f1f0a8b1"])
def test_find_refuses_a_start_that_several_ids_have_and_names_them(
    world: World, start: str
) -> None:
    _seed_ids(world, *TWINS)

    with pytest.raises(AmbiguousId) as raised:
        _find(world, start)

    assert isinstance(raised.value, InvalidArgument)
    assert raised.value.code == "ambiguous_id"
    assert all(twin in raised.value.message for twin in TWINS)
    assert start in raised.value.message


@pytest.mark.parametrize(
    ("start", "message"),
    [
        ("3", "Give at least 4 characters of the id, not 3."),
        (" 3f0\n", "Give at least 4 characters of the id, not 3f0."),
        ("", "Give at least 4 characters of the id."),
        ("  ", "Give at least 4 characters of the id."),
    ],
)
def test_find_refuses_a_start_shorter_than_four_digits(
    world: World, start: str, message: str
) -> None:
    _seed_ids(world, LONER)

    with pytest.raises(InvalidArgument) as raised:
        _find(world, start)

    assert (raised.value.code, raised.value.message) == ("invalid_argument", message)


@pytest.mark.parametrize(
    ("use_case", "text", "error"),
    [
        (GetQnA, "nope", NotFound),
        (GetQnA, "3f0d", NotFound),
        (FindQnA, "nope", NotFound),
        (FindQnA, "3f0", InvalidArgument),
    ],
)
def test_what_is_not_an_id_on_its_face_is_refused_without_asking_the_database(
    world: World, use_case: type[GetQnA], text: str, error: type[Exception]
) -> None:
    world.uow.fail_next(DATABASE_DOWN)

    with pytest.raises(error):
        use_case(world.uow)(text)

    assert world.uow.opened == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3f0e", "No question has an id starting 3f0e."),
        ("3f0d-", "No question with id 3f0d-."),  # a hyphen out of place
        ("3f0d00000-", "No question with id 3f0d00000-."),
        ("3f0dxyz", "No question with id 3f0dxyz."),
        (LONER + "0", f"No question with id {LONER}0."),
    ],
)
def test_find_of_a_start_no_id_has_is_not_found(world: World, text: str, message: str) -> None:
    _seed_ids(world, LONER)

    with pytest.raises(NotFound) as raised:
        _find(world, text)

    assert raised.value.message == message


def test_find_reports_an_abandoned_record_it_finds_as_failed(world: World) -> None:
    _seed_ids(world, LONER)
    world.clock.advance(timedelta(minutes=10))

    found = _find(world, "3f0d")

    assert (found.status, found.error_kind) == (Status.FAILED, "abandoned")
    assert world.stored(UUID(LONER)).status is Status.FAILED


def test_get_takes_full_ids_only(world: World) -> None:
    _seed_ids(world, LONER)

    with pytest.raises(NotFound):
        GetQnA(world.uow)("3f0d")


# --- ListQnA -------------------------------------------------------------------------


def _seed_history(world: World, count: int, *, per_instant: int = 1) -> list[QnA]:
    """`count` records, `per_instant` sharing each created_at; newest first by (created_at, id)."""
    records = []
    for index in range(count):
        created_at = START + timedelta(seconds=index // per_instant)
        records.append(QnA.ask(f"question {index}", model="m", now=created_at))
    world.uow.seed(*records)
    return sorted(records, key=lambda q: (q.created_at, q.id), reverse=True)


def _walk(list_qna: ListQnA, *, limit: int) -> list[list[QnA]]:
    pages = []
    cursor = None
    while True:
        page = list_qna(limit=limit, cursor=cursor)
        pages.append(list(page.items))
        if page.next_cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not end"
        cursor = page.next_cursor


def test_list_is_newest_first(world: World) -> None:
    expected = _seed_history(world, 5)

    page = ListQnA(world.uow)()

    assert [q.question for q in page.items] == [f"question {i}" for i in (4, 3, 2, 1, 0)]
    assert [q.id for q in page.items] == [q.id for q in expected]
    assert page.next_cursor is None


def test_list_of_an_empty_history_is_one_empty_page(world: World) -> None:
    page = ListQnA(world.uow)()

    assert list(page.items) == []
    assert page.next_cursor is None


@pytest.mark.parametrize(
    ("count", "per_instant", "limit", "sizes"),
    [
        (7, 1, 3, [3, 3, 1]),
        (6, 1, 3, [3, 3]),  # an exact multiple: the last full page says so
        (12, 4, 5, [5, 5, 2]),  # ties on created_at straddle page boundaries
        (9, 9, 2, [2, 2, 2, 2, 1]),  # every record created at the same instant
        (3, 1, 1, [1, 1, 1]),
    ],
)
def test_walking_the_cursor_visits_every_record_once_in_order(
    world: World, count: int, per_instant: int, limit: int, sizes: list[int]
) -> None:
    expected = _seed_history(world, count, per_instant=per_instant)

    pages = _walk(ListQnA(world.uow), limit=limit)

    assert [len(p) for p in pages] == sizes
    assert [q.id for p in pages for q in p] == [q.id for q in expected]


def test_a_record_added_while_paging_does_not_shift_the_pages(world: World) -> None:
    expected = _seed_history(world, 6)
    list_qna = ListQnA(world.uow)
    first = list_qna(limit=3)
    world.uow.seed(QnA.ask("brand new", model="m", now=START + timedelta(days=1)))

    second = list_qna(limit=3, cursor=first.next_cursor)

    assert [q.id for q in [*first.items, *second.items]] == [q.id for q in expected]
    assert second.next_cursor is None


@pytest.mark.parametrize("limit", [1, 100])
def test_limit_bounds_are_inclusive(world: World, limit: int) -> None:
    _seed_history(world, 101)

    page = ListQnA(world.uow)(limit=limit)

    assert len(page.items) == limit
    assert page.next_cursor is not None


@pytest.mark.parametrize("limit", [0, -1, 101])
def test_limit_out_of_bounds_is_refused(world: World, limit: int) -> None:
    with pytest.raises(InvalidArgument, match="integer from 1 to 100"):
        ListQnA(world.uow)(limit=limit)


@pytest.mark.parametrize("limit", ["10", 1.5, 10.0, None, True], ids=repr)
def test_a_limit_that_is_not_an_integer_is_refused(world: World, limit: object) -> None:
    # Before: a TypeError about '<=' or slice indices (1.5 passed the range check).
    with pytest.raises(InvalidArgument, match="integer from 1 to 100"):
        ListQnA(world.uow)(limit=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("cursor", [123, b"abc", ["x"]], ids=repr)
def test_a_cursor_that_is_not_a_string_is_refused(world: World, cursor: object) -> None:
    # Before: 123 was "TypeError: object of type 'int' has no len()".
    with pytest.raises(InvalidCursor):
        ListQnA(world.uow)(cursor=cursor)  # type: ignore[arg-type]


def _b64(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


GARBAGE_CURSORS = {
    "not-base64": "!!!not a cursor!!!",
    "non-ascii": "curs\u00f6r",
    "not-json": base64.urlsafe_b64encode(b"hello there").decode(),
    "json-object": _b64({"created_at": "2025-01-01T00:00:00+00:00", "id": str(uuid4())}),
    "json-number": _b64(7),
    "three-items": _b64(["2025-01-01T00:00:00+00:00", str(uuid4()), "x"]),
    "bad-date": _b64(["yesterday", str(uuid4())]),
    "naive-date": _b64(["2025-01-01T00:00:00", str(uuid4())]),
    "bad-uuid": _b64(["2025-01-01T00:00:00+00:00", "not-a-uuid"]),
    "null-uuid": _b64(["2025-01-01T00:00:00+00:00", None]),
}


@pytest.mark.parametrize("cursor", GARBAGE_CURSORS.values(), ids=GARBAGE_CURSORS.keys())
def test_a_garbage_cursor_is_refused(world: World, cursor: str) -> None:
    _seed_history(world, 3)

    with pytest.raises(InvalidCursor):
        ListQnA(world.uow)(cursor=cursor)


@pytest.mark.parametrize(
    "cursor",
    [
        _b64(["2025-01-01T00:00:00+00:00", 5]),
        _b64(["2025-01-01T00:00:00+00:00", ["x"]]),
        base64.urlsafe_b64encode(b"[" * 3000).decode(),
    ],
    ids=["int-id", "list-id", "deep-nesting"],
)
def test_a_cursor_of_the_wrong_json_shape_is_refused(world: World, cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        ListQnA(world.uow)(cursor=cursor)


def test_next_cursor_points_past_the_last_item_of_the_page(world: World) -> None:
    expected = _seed_history(world, 4)

    page = ListQnA(world.uow)(limit=2)

    assert page.next_cursor == encode_cursor(expected[1])


# --- ListQnA: by status -------------------------------------------------------------


def _seed_every_status(world: World) -> dict[str, QnA]:
    """One record of each kind, oldest first: a failure, an answer, a pending ask whose
    asker died (older than abandon_after), and one still being answered."""
    failed = QnA.ask("failed", model="m", now=START)
    failed.record_failure(LLMTimeout("slow"), latency_ms=1, now=START)
    answered = QnA.ask("answered", model="m", now=START + timedelta(minutes=1))
    answered.record_answer(
        answer="a", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=START
    )
    abandoned = QnA.ask("abandoned", model="m", now=START + timedelta(minutes=2))
    pending = QnA.ask("pending", model="m", now=START + timedelta(minutes=9))
    world.uow.seed(failed, answered, abandoned, pending)
    world.clock.advance(START + timedelta(minutes=10) - world.clock())
    return {q.question: q for q in (failed, answered, abandoned, pending)}


def _list(world: World, **kwargs: Any) -> Page:
    return ListQnA(world.uow, abandon_after=timedelta(minutes=5), clock=world.clock)(**kwargs)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (Status.FAILED, ["abandoned", "failed"]),
        ("failed", ["abandoned", "failed"]),
        (Status.ANSWERED, ["answered"]),
        ("pending", ["pending"]),
        (None, ["pending", "abandoned", "answered", "failed"]),
    ],
)
def test_list_by_status_counts_an_abandoned_ask_as_failed(
    world: World, status: Status | str | None, expected: list[str]
) -> None:
    _seed_every_status(world)

    page = _list(world, status=status)

    assert [q.question for q in page.items] == expected
    if status is not None:
        assert {q.status for q in page.items} == {Status(status)}
    assert page.next_cursor is None


def test_listing_failures_closes_the_abandoned_it_shows(world: World) -> None:
    seeded = _seed_every_status(world)

    page = _list(world, status="failed")

    shown = {q.question: (q.status, q.error_kind) for q in page.items}
    assert shown["abandoned"] == (Status.FAILED, "abandoned")
    assert world.stored(seeded["abandoned"].id).status is Status.FAILED
    # Now stored as failed, it is found as one without the abandoned rule.
    assert [q.question for q in _list(world, status="failed").items] == ["abandoned", "failed"]


def test_walking_pages_of_one_status_visits_each_of_its_records_once(world: World) -> None:
    records = []
    for index in range(11):
        qna = QnA.ask(f"q{index}", model="m", now=START + timedelta(seconds=index // 2))
        if index % 3:
            qna.record_failure(LLMTimeout("slow"), latency_ms=1, now=START)
        else:
            qna.record_answer(
                answer="a", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=START
            )
        records.append(qna)
    world.uow.seed(*records)
    failures = sorted(
        (q for q in records if q.status is Status.FAILED),
        key=lambda q: (q.created_at, q.id),
        reverse=True,
    )

    seen: list[QnA] = []
    cursor = None
    while True:
        page = _list(world, status=Status.FAILED, limit=3, cursor=cursor)
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert [q.id for q in seen] == [q.id for q in failures]
    assert len(seen) == 7


@pytest.mark.parametrize("status", ["FAILED", "done", "", " failed", 1, True, ["failed"]], ids=repr)
def test_a_status_that_is_none_of_the_three_is_refused(world: World, status: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        _list(world, status=status)

    assert raised.value.message == "status must be one of pending, answered, failed."


def test_the_default_sleep_is_time_sleep_as_it_is_when_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gevent workers patch time.sleep after this module was imported; a default bound
    # at import would block every ask in the worker while one waits for its key.
    ask = AskQuestion(FakeUnitOfWorkFactory(), FakeLLM())
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)

    ask._sleep(0.05)

    assert slept == [0.05]
