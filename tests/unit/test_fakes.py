"""The fakes behave like the real thing where the use-case tests rely on it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from qna.application.ports import PageKey
from qna.domain import LLMTimeout, QnA, Status
from qna.domain.model import Abandonment
from tests.fakes import START, FakeLLM, FakeRepository, FakeUnitOfWorkFactory


def _qna(question: str = "q", *, seconds: int = 0, model: str = "m") -> QnA:
    return QnA.ask(question, model=model, now=START + timedelta(seconds=seconds))


def test_changes_are_invisible_to_other_units_of_work_until_commit() -> None:
    factory = FakeUnitOfWorkFactory()
    qna = _qna()

    with factory() as writer:
        writer.qnas.add(qna)
        with factory() as reader:
            assert reader.qnas.get(qna.id) is None
        writer.commit()

    with factory() as reader:
        assert reader.qnas.get(qna.id) == qna
    assert writer.committed


def test_leaving_without_commit_discards_the_changes() -> None:
    factory = FakeUnitOfWorkFactory()

    with factory() as uow:
        uow.qnas.add(_qna())

    assert factory.committed_records() == []
    assert not factory.units[0].committed
    assert factory.open_count == 0


def test_an_exception_inside_the_block_rolls_back() -> None:
    factory = FakeUnitOfWorkFactory([_qna("kept")])

    with pytest.raises(RuntimeError), factory() as uow:
        uow.qnas.add(_qna("lost"))
        raise RuntimeError

    assert [q.question for q in factory.committed_records()] == ["kept"]


def test_mutating_a_record_without_save_does_not_reach_the_store() -> None:
    factory = FakeUnitOfWorkFactory()
    qna = _qna()
    with factory() as uow:
        uow.qnas.add(qna)
        qna.abandon(now=START)  # after add, before commit: must not leak
        uow.commit()

    with factory() as uow:
        got = uow.qnas.get(qna.id)
        assert got is not None
        got.abandon(now=START)
        uow.commit()

    assert factory.committed_records()[0].status is Status.PENDING


def test_save_of_a_record_never_added_is_an_error() -> None:
    with pytest.raises(LookupError):
        FakeRepository().save(_qna())


def test_add_of_an_existing_id_is_an_error() -> None:
    qna = _qna()
    factory = FakeUnitOfWorkFactory([qna])

    with pytest.raises(ValueError, match="duplicate"), factory() as uow:
        uow.qnas.add(qna)


def test_list_orders_by_created_at_then_id_and_honours_before() -> None:
    records = [_qna(seconds=s) for s in (0, 1, 1, 1, 2)]
    repo = FakeRepository({q.id: q for q in records})
    expected = sorted(records, key=lambda q: (q.created_at, q.id), reverse=True)

    assert [q.id for q in repo.list(limit=10)] == [q.id for q in expected]
    pivot = expected[2]
    older = repo.list(limit=10, before=PageKey(created_at=pivot.created_at, id=pivot.id))
    assert [q.id for q in older] == [q.id for q in expected[3:]]


def test_add_or_answer_from_cache_and_list_pending() -> None:
    answered = _qna("What?", seconds=0)
    answered.record_answer(
        answer="a", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, now=START
    )
    cached = _qna("what?", seconds=5)
    cached.record_cached(answered, now=START)
    pending = _qna("What?", seconds=1)
    repo = FakeRepository({q.id: q for q in (answered, cached, pending)})

    hit = repo.add_or_answer_from_cache(_qna("WHAT?", seconds=6), since=START, now=START)
    assert hit.source_id == answered.id
    assert repo.get(hit.id) == hit
    other_model = _qna("What?", seconds=6, model="other")
    assert repo.add_or_answer_from_cache(other_model, since=START, now=START) == other_model
    too_late = START + timedelta(seconds=1)
    late = _qna("What?", seconds=6)
    assert repo.add_or_answer_from_cache(late, since=too_late, now=START) == late
    assert repo.get(late.id) == late
    before = START + timedelta(seconds=2)
    no_time = timedelta(0)  # abandoned once created before `now`
    abandoned = Abandonment(before, no_time)
    assert [q.id for q in repo.list_pending(abandoned=abandoned, limit=5)] == [pending.id]
    assert repo.list_pending(abandoned=Abandonment(pending.created_at, no_time), limit=5) == []


def test_fake_llm_follows_its_script_then_refuses_to_improvise() -> None:
    error = LLMTimeout("slow")
    llm = FakeLLM(script=["one", error])

    assert llm.complete("a").text == "one"
    with pytest.raises(LLMTimeout) as raised:
        llm.complete("b")
    assert raised.value is error
    with pytest.raises(AssertionError, match="script ran out"):
        llm.complete("c")
    assert llm.calls == 3
    assert llm.questions == ["a", "b", "c"]
