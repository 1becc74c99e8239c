"""qna's errors cross a process boundary intact: pickled by multiprocessing or a
ProcessPoolExecutor, an error arrives as itself, with its message and attributes."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest

import qna

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
QNA_ID = UUID("3f0c2c4e-8d3a-4f43-9a57-3f7f1f0a8b11")

# Every error class `import qna` offers; a class added to `qna.__all__` is tested too.
EXPORTED_ERRORS = sorted(
    (
        value
        for value in (getattr(qna, name) for name in qna.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    ),
    key=lambda cls: cls.__name__,
)


def answered_record() -> qna.QnA:
    record = qna.QnA.ask("What is 2+2?", model="gpt-5-mini", now=NOW)
    record.record_answer(
        answer="4",
        model="gpt-5-mini-2025",
        prompt_tokens=9,
        completion_tokens=1,
        latency_ms=12,
        now=NOW,
    )
    return record


def llm_error(cls: type[qna.LLMError]) -> qna.LLMError:
    error = cls("The LLM timed out after 60 s.", retry_after=2.5)
    error.qna_id = QNA_ID
    return error


# How to make an instance of each kind of error with every attribute it carries set
# (none left at its default), found by the error's class or its nearest base.
EXAMPLES: dict[type[BaseException], Callable[[Any], BaseException]] = {
    qna.QnAError: lambda cls: cls("Something went wrong."),
    qna.StorageUnavailable: lambda cls: cls("The database is not a database.", retryable=False),
    qna.OutcomeNotStored: lambda cls: cls(
        "The disk is full.",
        answered_record(),
        retryable=False,
        llm_error=llm_error(qna.LLMRateLimited),
    ),
    qna.LLMError: llm_error,
}


def example(cls: type[BaseException]) -> BaseException:
    for base in cls.__mro__:
        if base in EXAMPLES:
            return EXAMPLES[base](cls)
    raise AssertionError(f"add an example of {cls.__name__} to EXAMPLES")


def assert_same_error(copy: BaseException, original: BaseException) -> None:
    assert type(copy) is type(original)
    assert str(copy) == str(original)
    assert copy.args == original.args
    assert vars(copy).keys() == vars(original).keys()
    for name, value in vars(original).items():
        if isinstance(value, BaseException):
            assert_same_error(getattr(copy, name), value)
        else:
            assert getattr(copy, name) == value, name


def test_every_qna_error_is_exported_and_tested() -> None:
    # The base, so that the test below covers more than nothing.
    assert qna.QnAError in EXPORTED_ERRORS
    assert qna.OutcomeNotStored in EXPORTED_ERRORS
    assert len(EXPORTED_ERRORS) >= 14


@pytest.mark.parametrize("cls", EXPORTED_ERRORS, ids=lambda cls: cls.__name__)
def test_an_error_survives_pickling_with_its_message_and_attributes(
    cls: type[BaseException],
) -> None:
    original = example(cls)

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(original, protocol=protocol))
        assert_same_error(copy, original)


def test_the_attributes_of_an_outcome_not_stored_survive_pickling() -> None:
    # Spelled out, for the error that carries the most: the answer already paid for.
    original = example(qna.OutcomeNotStored)
    assert isinstance(original, qna.OutcomeNotStored)

    copy = pickle.loads(pickle.dumps(original))

    assert isinstance(copy, qna.OutcomeNotStored)
    assert copy.qna.answer == "4"
    assert copy.qna == original.qna
    assert copy.retryable is False
    assert isinstance(copy.llm_error, qna.LLMRateLimited)
    assert copy.llm_error.qna_id == QNA_ID
    assert copy.llm_error.retry_after == 2.5
    assert copy.code == "database_unavailable"


def raise_outcome_not_stored() -> None:
    raise example(qna.OutcomeNotStored)


def test_an_error_raised_in_a_process_pool_arrives_as_itself() -> None:
    with ProcessPoolExecutor(max_workers=1) as pool:
        future = pool.submit(raise_outcome_not_stored)

        with pytest.raises(qna.OutcomeNotStored) as raised:
            future.result(timeout=60)

    assert raised.value.qna.answer == "4"
    assert isinstance(raised.value.llm_error, qna.LLMRateLimited)
