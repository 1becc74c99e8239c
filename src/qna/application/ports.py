"""What the use cases need from the outside world, named for the need, not the vendor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self
from uuid import UUID

from qna.domain.model import Abandonment, QnA, Status


@dataclass(frozen=True)
class Completion:
    """One answer from an LLM."""

    text: str
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Why the LLM stopped ("stop", "length", ...), when it said.
    finish_reason: str | None = None


class LLM(Protocol):
    """An LLM that answers a question with one completion.

    Callers depend on `complete` only; a streaming variant would be a second method
    (yielding text pieces, then a `Completion`) on adapters that can stream, so
    nothing that calls `complete` changes when it arrives.
    """

    @property
    def model(self) -> str:
        """The model asked for, recorded on a question before it is answered."""
        ...

    def complete(self, question: str) -> Completion:
        """Answer, or raise a subclass of `qna.domain.LLMError`."""
        ...


@dataclass(frozen=True)
class PageKey:
    """Where a page of history starts: strictly older than this (created_at, id)."""

    created_at: datetime
    id: UUID


class DuplicateIdempotencyKey(Exception):
    """Raised by `QnARepository.add` when another record holds the same idempotency key."""


class QnARepository(Protocol):
    def add(self, qna: QnA) -> None:
        """Insert; raises DuplicateIdempotencyKey when the key is already held."""
        ...

    def save(self, qna: QnA) -> None:
        """Write back the outcome (`OUTCOME_FIELDS`) of a record got from `get` or `add`.

        Nothing else is written: a late save cannot undo `release_idempotency_key`."""
        ...

    def close_pending(self, qna: QnA) -> bool:
        """Like `save`, but only while the stored record is still pending; False (and
        nothing written) when its outcome was stored since it was read."""
        ...

    def get(self, qna_id: UUID) -> QnA | None: ...

    def list_by_id(self, *, first: UUID, last: UUID, limit: int) -> Sequence[QnA]:
        """The records whose id is from `first` to `last` (both included), in id order."""
        ...

    def list(
        self,
        *,
        limit: int,
        before: PageKey | None = None,
        status: Status | None = None,
        abandoned: Abandonment | None = None,
    ) -> Sequence[QnA]:
        """Newest first, by (created_at, id). With `status`, only the records in it,
        where one still pending but `abandoned` counts as failed (its asker died:
        `QnA.is_abandoned`), as readers are told."""
        ...

    def add_or_answer_from_cache(self, qna: QnA, *, since: datetime, now: datetime) -> QnA:
        """Add a pending `qna` as `add` does — answered from the cache if it can be.

        The cache's source is the newest record of the same question (after
        `normalise_for_cache`) and model, not older than `since`, that the LLM itself
        answered. If there is one, the record goes in as `qna.record_cached(source,
        now=now)` leaves it. Returns the record as stored; `qna` is left unchanged.
        Looking up and adding are one round trip where the store allows.
        """
        ...

    def list_pending(self, *, abandoned: Abandonment, limit: int) -> Sequence[QnA]:
        """Up to `limit` pending records that are `abandoned`, oldest first."""
        ...

    def get_by_idempotency_key(self, key: str) -> QnA | None: ...

    def release_idempotency_key(self, qna_id: UUID) -> None:
        """Free the record's key so a new ask can take it."""
        ...


class UnitOfWork(Protocol):
    """One transaction. Leaving the block without `commit()` rolls everything back.

    Opened with `autocommit=True` (see `UnitOfWorkFactory`), it is no transaction:
    each statement commits on its own as it runs, and `commit()` and `rollback()`
    do nothing. That is for work whose writes each stand alone — one insert, one
    update — and saves the round trips that open and close a transaction.
    """

    # Read-only to the core: as a plain attribute it would be settable, and so
    # invariant, and an adapter's own repository type would not satisfy it.
    @property
    def qnas(self) -> QnARepository: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class UnitOfWorkFactory(Protocol):
    def __call__(self, *, autocommit: bool = False) -> UnitOfWork: ...
