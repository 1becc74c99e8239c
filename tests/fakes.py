"""In-memory stand-ins for the ports, so use-case tests are fast and exact.

The unit-of-work fakes behave like a real transaction, not like a dict: changes become
visible to other units of work only on `commit()` (or, in an autocommit unit, as each
write is made), and records are deep-copied on the way in and out, so a use case that
forgets to `save` or `commit` fails here as it would against PostgreSQL.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self
from uuid import UUID

from qna.application.ports import Completion, DuplicateIdempotencyKey, PageKey, QnARepository
from qna.domain.model import OUTCOME_FIELDS, Abandonment, QnA, Status, normalise_for_cache

START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A wall clock that moves only when a test says so."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class FakeTimer:
    """A monotonic timer (seconds, like `time.perf_counter`) that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


ScriptItem = Completion | str | BaseException


class FakeLLM:
    """An LLM whose answers, failures and side effects a test decides.

    Without a script every call returns `answer`. With a script, each call takes the next
    item: a `Completion` is returned, a `str` is returned as the answer text, an exception
    is raised (the very instance given, so a test can check identity). A call past the end
    of a script is an error in the test, not a silent default answer.
    """

    def __init__(
        self,
        answer: str = "42",
        *,
        model: str = "fake-model",
        answered_by: str | None = None,
        prompt_tokens: int | None = 11,
        completion_tokens: int | None = 7,
        script: Iterable[ScriptItem] | None = None,
        on_call: Callable[[str], None] | None = None,
    ) -> None:
        self.answer = answer
        self._model = model
        #: The model the provider says answered (OpenAI reports a dated snapshot).
        self.answered_by = answered_by if answered_by is not None else model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self._script: deque[ScriptItem] | None = deque(script) if script is not None else None
        self.on_call = on_call
        self.calls = 0
        self.questions: list[str] = []

    @property
    def model(self) -> str:
        return self._model

    def complete(self, question: str) -> Completion:
        self.calls += 1
        self.questions.append(question)
        if self.on_call is not None:
            self.on_call(question)
        if self._script is None:
            return self._completion(self.answer)
        if not self._script:
            raise AssertionError(f"FakeLLM was called {self.calls} times; its script ran out")
        item = self._script.popleft()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str):
            return self._completion(item)
        return item

    def _completion(self, text: str) -> Completion:
        return Completion(
            text=text,
            model=self.answered_by,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


def _status_read(qna: QnA, abandoned: Abandonment | None) -> Status:
    """The status a reader is told: a pending record that is `abandoned` is failed."""
    if abandoned is not None and qna.is_abandoned(abandoned):
        return Status.FAILED
    return qna.status


def _key(qna: QnA) -> tuple[datetime, UUID]:
    # UUID ordering is by its 128-bit integer, which is PostgreSQL's byte order for uuid.
    return (qna.created_at, qna.id)


class FakeRepository:
    """A QnARepository over a committed store plus this transaction's own writes.

    `committed` is read, never written: writes go to `changes`, which the unit of work
    publishes on commit and drops on rollback. Standalone (no store given), it is simply
    an in-memory repository whose writes it sees itself.
    """

    def __init__(
        self,
        committed: Mapping[UUID, QnA] | None = None,
        *,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self._committed: Mapping[UUID, QnA] = committed if committed is not None else {}
        self.changes: dict[UUID, QnA] = {}
        #: Called after each write (an autocommit unit of work publishes it there).
        self._on_write = on_write

    def add(self, qna: QnA) -> None:
        if qna.id in self._committed or qna.id in self.changes:
            raise ValueError(f"duplicate key: QnA {qna.id} already exists")
        if qna.idempotency_key is not None and self.get_by_idempotency_key(qna.idempotency_key):
            raise DuplicateIdempotencyKey(qna.idempotency_key)
        self.changes[qna.id] = copy.deepcopy(qna)
        self._wrote()

    def get_by_idempotency_key(self, key: str) -> QnA | None:
        for qna in self._visible().values():
            if qna.idempotency_key == key:
                return copy.deepcopy(qna)
        return None

    def release_idempotency_key(self, qna_id: UUID) -> None:
        qna = copy.deepcopy(self._visible()[qna_id])
        qna.idempotency_key = None
        self.changes[qna_id] = qna
        self._wrote()

    def save(self, qna: QnA) -> None:
        stored = self._visible().get(qna.id)
        if stored is None:
            raise LookupError(f"cannot save QnA {qna.id}: it was never added")
        saved = copy.deepcopy(stored)
        for name in OUTCOME_FIELDS:
            setattr(saved, name, copy.deepcopy(getattr(qna, name)))
        self.changes[qna.id] = saved
        self._wrote()

    def close_pending(self, qna: QnA) -> bool:
        stored = self._visible().get(qna.id)
        if stored is None or stored.status is not Status.PENDING:
            return False
        self.save(qna)
        return True

    def get(self, qna_id: UUID) -> QnA | None:
        qna = self._visible().get(qna_id)
        return copy.deepcopy(qna) if qna is not None else None

    def list_by_id(self, *, first: UUID, last: UUID, limit: int) -> Sequence[QnA]:
        in_range = sorted(
            (qna for qna in self._visible().values() if first <= qna.id <= last),
            key=lambda qna: qna.id,
        )
        return copy.deepcopy(in_range[:limit])

    def list(
        self,
        *,
        limit: int,
        before: PageKey | None = None,
        status: Status | None = None,
        abandoned: Abandonment | None = None,
    ) -> Sequence[QnA]:
        rows: Iterable[QnA] = self._visible().values()
        if status is not None:
            rows = [qna for qna in rows if _status_read(qna, abandoned) is status]
        if before is not None:
            bound = (before.created_at, before.id)
            rows = [qna for qna in rows if _key(qna) < bound]
        newest_first = sorted(rows, key=_key, reverse=True)
        return copy.deepcopy(newest_first[:limit])

    def add_or_answer_from_cache(self, qna: QnA, *, since: datetime, now: datetime) -> QnA:
        normalised = normalise_for_cache(qna.question)
        sources = [
            stored
            for stored in self._visible().values()
            if stored.status is Status.ANSWERED
            and stored.model == qna.model
            and stored.source_id is None
            and stored.created_at >= since
            and normalise_for_cache(stored.question) == normalised
        ]
        added = copy.deepcopy(qna)
        if sources:
            added.record_cached(max(sources, key=_key), now=now)
        self.add(added)
        return added

    def list_pending(self, *, abandoned: Abandonment, limit: int) -> Sequence[QnA]:
        pending = [qna for qna in self._visible().values() if qna.is_abandoned(abandoned)]
        return copy.deepcopy(sorted(pending, key=_key)[:limit])

    def _wrote(self) -> None:
        if self._on_write is not None:
            self._on_write()

    def _visible(self) -> dict[UUID, QnA]:
        return {**self._committed, **self.changes}


class FakeUnitOfWork:
    """One transaction over a shared store: read committed, rolled back unless committed.

    With `autocommit=True`, each write reaches the store as it is made, and `commit()`
    and `rollback()` do nothing (as the port says).
    """

    def __init__(
        self,
        store: dict[UUID, QnA] | None = None,
        *,
        autocommit: bool = False,
        on_enter: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._store: dict[UUID, QnA] = store if store is not None else {}
        self.autocommit = autocommit
        self._on_enter = on_enter
        self._on_exit = on_exit
        self.repository = FakeRepository(
            self._store, on_write=self._publish if autocommit else None
        )
        # Typed as the port: the protocol's attribute is mutable, so mypy wants it exact.
        self.qnas: QnARepository = self.repository
        self.committed = False
        self.commits = 0
        self.rollbacks = 0

    def __enter__(self) -> Self:
        if self._on_enter is not None:
            self._on_enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.rollback()
        if self._on_exit is not None:
            self._on_exit()

    def commit(self) -> None:
        if self.autocommit:
            return
        self._publish()
        self.committed = True
        self.commits += 1

    def rollback(self) -> None:
        if self.autocommit:
            return
        self.repository.changes = {}
        self.rollbacks += 1

    def _publish(self) -> None:
        self._store.update(self.repository.changes)
        self.repository.changes = {}


class FakeUnitOfWorkFactory:
    """Makes a new FakeUnitOfWork per call, all over one committed store.

    `open_count` is how many units of work are inside their `with` block right now, so
    a test can check that none is open while the LLM thinks (see `watch`).
    """

    def __init__(self, records: Iterable[QnA] = ()) -> None:
        self.store: dict[UUID, QnA] = {}
        self.units: list[FakeUnitOfWork] = []
        self.open_count = 0
        self.max_open = 0
        #: `open_count` at each call of a watched LLM.
        self.open_during_llm_calls: list[int] = []
        self._failures: list[BaseException] = []
        self.seed(*records)

    def fail_next(self, error: BaseException, *, times: int = 1) -> None:
        """The next `times` units of work raise `error` as they start, as a database that
        is down (or a statement cancelled) makes a real one do."""
        self._failures.extend([error] * times)

    def __call__(self, *, autocommit: bool = False) -> FakeUnitOfWork:
        uow = FakeUnitOfWork(
            self.store, autocommit=autocommit, on_enter=self._entered, on_exit=self._exited
        )
        self.units.append(uow)
        return uow

    @property
    def opened(self) -> int:
        return len(self.units)

    def seed(self, *records: QnA) -> None:
        """Put records straight into the committed store, as an earlier process would have."""
        for qna in records:
            self.store[qna.id] = copy.deepcopy(qna)

    def committed_records(self) -> list[QnA]:
        """Everything committed, newest first."""
        return copy.deepcopy(sorted(self.store.values(), key=_key, reverse=True))

    def watch(self, llm: FakeLLM) -> None:
        """Record `open_count` whenever `llm` is called, before its own hook runs."""
        inner = llm.on_call

        def on_call(question: str) -> None:
            self.open_during_llm_calls.append(self.open_count)
            if inner is not None:
                inner(question)

        llm.on_call = on_call

    def _entered(self) -> None:
        if self._failures:
            raise self._failures.pop(0)
        self.open_count += 1
        self.max_open = max(self.max_open, self.open_count)

    def _exited(self) -> None:
        self.open_count -= 1
