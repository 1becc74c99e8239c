"""The things a person can do with qna: ask, read one record, read the history."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from qna.application.ports import (
    LLM,
    DuplicateIdempotencyKey,
    PageKey,
    QnARepository,
    UnitOfWork,
    UnitOfWorkFactory,
)
from qna.domain.errors import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    LLMError,
    NotFound,
    OutcomeNotStored,
    QnAError,
    StorageUnavailable,
)
from qna.domain.model import (
    DEFAULT_MAX_QUESTION_LENGTH,
    OUTCOME_FIELDS,
    Abandonment,
    QnA,
    Status,
    parse_question,
)

Clock = Callable[[], datetime]
Timer = Callable[[], float]


#: Longer than any ask can take (the LLM deadline) with room to spare.
DEFAULT_ABANDON_AFTER = timedelta(minutes=5)


def utc_now() -> datetime:
    return datetime.now(UTC)


class InvalidArgument(QnAError):
    """A request parameter other than the question is out of range or malformed."""

    code = "invalid_argument"


class InvalidCursor(InvalidArgument):
    """The cursor is not one a page of history gave out."""

    code = "invalid_cursor"


class AmbiguousId(InvalidArgument):
    """The start of an id given to `FindQnA` starts more than one record's id."""

    code = "ambiguous_id"


@dataclass(frozen=True)
class Asked:
    """What `AskQuestion.ask` did: the record, and whether this call answered it."""

    qna: QnA
    #: True when the record is an earlier request's with the same idempotency key,
    #: answered before (a replay): nothing new was asked or stored.
    replayed: bool = False


#: An idempotency key as a caller gives it: visible ASCII (no space) but the comma, which
#: a WSGI server puts between two header lines of one name (RFC 9110, section 5.3):
#: their join would be a third key. One rule for the header and the library's argument.
IDEMPOTENCY_KEY_PATTERN = r"[\x21-\x2b\x2d-\x7e]{1,200}"
_SANE_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def parse_idempotency_key(key: object, *, name: str) -> str:
    """`key` if it is one a caller may give (the entrypoint scopes it); else
    InvalidArgument, naming the key by `name` as the caller gave it."""
    if not isinstance(key, str) or not _SANE_KEY.fullmatch(key):
        raise InvalidArgument(
            f"{name} must be one key of 1 to 200 visible ASCII characters, "
            "without spaces or commas."
        )
    return key


def parse_ask(question: str, *, fresh: object, max_length: int) -> str:
    """The question as it is stored, once the ask is known to be well formed: raises
    InvalidQuestion, or InvalidArgument for a `fresh` that is not a bool."""
    text = parse_question(question, max_length=max_length)
    # Not its truth: "no" and "false" are true to Python, and would skip the cache.
    if not isinstance(fresh, bool):
        raise InvalidArgument(f"fresh must be True or False, not {type(fresh).__name__}.")
    return text


class AskQuestion:
    """Record the question, ask the LLM, record the outcome.

    No database connection is held while the LLM thinks: the question is committed in
    one short transaction, the LLM is called with no transaction open, and the outcome
    is committed in a second one. A failed call is recorded as failed, then raised.

    With an idempotency key, the database's unique constraint on the key decides
    which of several concurrent requests asks the LLM; the others wait for its record
    and return it. A failed or expired record frees its key for a new ask.
    """

    #: How long a request waits for the one that holds its key before it looks again:
    #: soon at first (most asks are short), then each wait half again as long as the
    #: last, up to a second. Many retries waiting on one slow ask each read the database
    #: 20 times a second when every wait was the first one.
    POLL_S = 0.05
    MAX_POLL_S = 1.0

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        llm: LLM,
        *,
        max_question_length: int = DEFAULT_MAX_QUESTION_LENGTH,
        cache_ttl: timedelta | None = None,
        abandon_after: timedelta = DEFAULT_ABANDON_AFTER,
        idempotency_ttl: timedelta = timedelta(hours=24),
        in_flight_wait: timedelta = timedelta(seconds=10),
        llm_deadline: timedelta = timedelta(minutes=2),
        clock: Clock = utc_now,
        timer: Timer = time.perf_counter,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self._uow = uow
        self._llm = llm
        self._max_question_length = max_question_length
        self._cache_ttl = cache_ttl
        self._idempotency_ttl = idempotency_ttl
        self._abandon_after = abandon_after
        self._in_flight_wait = in_flight_wait.total_seconds()
        self._llm_deadline = llm_deadline
        self._clock = clock
        self._timer = timer
        # Looked up at each call, not bound at import: under gevent workers the
        # cooperative time.sleep is patched in after this module was imported.
        self._sleep = sleep if sleep is not None else _sleep

    def __call__(
        self, question: str, *, fresh: bool = False, idempotency_key: str | None = None
    ) -> QnA:
        return self.ask(question, fresh=fresh, idempotency_key=idempotency_key).qna

    def ask(
        self, question: str, *, fresh: bool = False, idempotency_key: str | None = None
    ) -> Asked:
        """Like calling it, and also says whether the answer is a replay."""
        text = parse_ask(question, fresh=fresh, max_length=self._max_question_length)
        qna = QnA.ask(
            text, model=self._llm.model, now=self._clock(), abandon_after=self._abandon_after
        )
        if idempotency_key is None:
            return Asked(self._ask(qna, fresh=fresh))
        qna.idempotency_key = idempotency_key
        qna.request_fingerprint = _fingerprint(text, fresh)
        return self._ask_once(qna, fresh=fresh)

    def _ask(self, qna: QnA, *, fresh: bool) -> QnA:
        # Autocommit: the insert, the cache look-up included, is one statement.
        with self._uow(autocommit=True) as uow:
            if fresh or self._cache_ttl is None:
                uow.qnas.add(qna)
            else:
                qna = uow.qnas.add_or_answer_from_cache(
                    qna, since=qna.created_at - self._cache_ttl, now=self._clock()
                )
        if qna.status is Status.ANSWERED:
            return qna  # from the cache

        started = self._timer()
        try:
            completion = self._llm.complete(qna.question)
        except LLMError as error:
            qna.record_failure(error, latency_ms=self._elapsed_ms(started), now=self._clock())
            self._save(qna, llm_error=error)
            error.qna_id = qna.id
            raise
        except KeyboardInterrupt:
            # Ctrl-C at the command line: the asker stops, and says so now rather than
            # leave the record pending until it is old enough to count as abandoned.
            # If the database will not take that, it is read so then all the same; the
            # interrupt, not the database, is what the asker is told.
            # One try, not `_save`'s two: the asker is leaving.
            qna.abandon(now=self._clock())
            with contextlib.suppress(StorageUnavailable):
                self._save_once(qna)
            raise
        qna.record_answer(
            answer=completion.text,
            model=completion.model,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason=completion.finish_reason,
            latency_ms=self._elapsed_ms(started),
            now=self._clock(),
        )
        self._save(qna)
        return qna

    def _ask_once(self, qna: QnA, *, fresh: bool) -> Asked:
        give_up_at = self._timer() + self._in_flight_wait
        while True:
            # Asked now, not when the wait began: a record stamped then would count
            # as abandoned (and another retry would ask the LLM again) while its own
            # LLM call was still within its deadline.
            qna.restamp(self._clock(), abandon_after=self._abandon_after)
            try:
                # A lost key leaves `qna` as it was: pending, and never stored.
                return Asked(self._ask(qna, fresh=fresh))
            except DuplicateIdempotencyKey:
                pass
            answered = self._wait_for_the_holder(qna, give_up_at)
            if answered is not None:
                return Asked(answered, replayed=True)

    def _wait_for_the_holder(self, qna: QnA, give_up_at: float) -> QnA | None:
        """Watch the record that holds `qna`'s key until it is answered (returned, to
        replay) or lets the key go (None: the next insert may take it); or give up.

        Reads only: an insert that loses to the key costs a dead row and a transaction
        id, and a retry waiting for a slow ask tried one every poll.
        """
        key = qna.idempotency_key
        assert key is not None
        poll = self.POLL_S
        while True:
            with self._uow() as uow:
                holder = uow.qnas.get_by_idempotency_key(key)
                if holder is not None and self._frees_its_key(holder, qna):
                    if holder.is_abandoned(Abandonment(qna.created_at, self._abandon_after)):
                        # Its asker died: close it, so the history says so — unless
                        # its answer landed after all (then the next read replays it).
                        holder.abandon(now=qna.created_at)
                        if not uow.qnas.close_pending(holder):
                            continue
                    uow.qnas.release_idempotency_key(holder.id)
                    uow.commit()
                    return None
            if holder is None:
                return None  # released since our insert: try to take it
            if holder.status is Status.ANSWERED:
                return holder
            if self._timer() >= give_up_at:
                raise IdempotencyKeyInFlight(
                    "A request with this Idempotency-Key is still being answered; retry later.",
                    retry_after=self._when_to_retry(holder),
                )
            self._sleep(min(poll, give_up_at - self._timer()))
            poll = min(poll * 1.5, self.MAX_POLL_S)
            # Expiry and abandonment are judged as of now.
            qna.restamp(self._clock(), abandon_after=self._abandon_after)

    def _when_to_retry(self, holder: QnA) -> float:
        """Seconds until the holder's ask is over but for one retry's own wait.

        By its LLM deadline the holder has answered (a retry replays it) or failed (a
        retry takes the key), and a retry waits `in_flight_wait` for it on its own: one
        that comes then is the last one needed. One that comes sooner may find it done,
        or be told 409 again. 0 once the deadline is that close or past (a holder whose
        process died is freed when it counts as abandoned). The holder's deadline is its
        asker's, as `abandon_at` tells it (less the margin this process adds to its
        own); a record stored before 0003 has this process's.
        """
        if holder.abandon_at is not None:
            over_at = holder.abandon_at - (self._abandon_after - self._llm_deadline)
        else:
            over_at = holder.created_at + self._llm_deadline
        left = (over_at - self._clock()).total_seconds()
        return max(0.0, left - self._in_flight_wait)

    def _frees_its_key(self, holder: QnA, asking: QnA) -> bool:
        if holder.created_at < asking.created_at - self._idempotency_ttl:
            return True  # expired: the key is anybody's again
        if holder.request_fingerprint != asking.request_fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request."
            )
        # A failed ask is retried for real; the failed record stays in the history.
        # So is one whose asker died mid-ask, leaving it pending for good.
        return holder.status is Status.FAILED or holder.is_abandoned(
            Abandonment(asking.created_at, self._abandon_after)
        )

    def _save(self, qna: QnA, *, llm_error: LLMError | None = None) -> None:
        """Store the outcome, or raise OutcomeNotStored carrying it (and the LLM's
        error, if that is the outcome: raised instead of it, it would be lost)."""
        try:
            self._save_once(qna)
        except StorageUnavailable:
            # The LLM has been paid for: one more try, on another connection, before
            # the outcome is lost (a connection dropped, a statement cancelled).
            try:
                self._save_once(qna)
            except StorageUnavailable as error:
                raise OutcomeNotStored(
                    error.message, qna, retryable=error.retryable, llm_error=llm_error
                ) from error

    def _save_once(self, qna: QnA) -> None:
        with self._uow(autocommit=True) as uow:
            uow.qnas.save(qna)

    def _elapsed_ms(self, started: float) -> int:
        return round((self._timer() - started) * 1000)


class _ReadsHistory:
    """A use case that reads stored records, closing abandoned ones as it meets them."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        *,
        abandon_after: timedelta = DEFAULT_ABANDON_AFTER,
        clock: Clock = utc_now,
    ) -> None:
        self._uow = uow
        self._abandon_after = abandon_after
        self._clock = clock

    def _report_abandoned(self, records: Sequence[QnA], *, now: datetime | None = None) -> None:
        """The abandoned among `records` (once read) are reported as failed, and stored
        so when the database takes the write, in a unit of work of its own. The read
        does not fail for want of it: a database that takes no writes (a standby, a
        read-only file) still shows its history."""
        abandoned = Abandonment(now if now is not None else self._clock(), self._abandon_after)
        if not any(qna.is_abandoned(abandoned) for qna in records):
            return
        try:
            with self._uow() as uow:
                _close_abandoned(uow, records, abandoned)
        except StorageUnavailable:
            for qna in records:
                if qna.is_abandoned(abandoned):
                    qna.abandon(now=abandoned.now)


class GetQnA(_ReadsHistory):
    """One record, by its full id."""

    def __call__(self, qna_id: UUID | str) -> QnA:
        # What is not an id on its face is no record: the database is not asked (were
        # it down, that is what the caller would be told).
        wanted = self.parse(qna_id)
        with self._uow() as uow:
            qna = self._find(uow.qnas, wanted)
        if qna is None:
            raise NotFound(f"No question with id {qna_id}.")
        self._report_abandoned([qna])
        return qna

    @staticmethod
    def parse(qna_id: UUID | str) -> UUID | IdStart:
        """What `qna_id` names; NotFound when it names nothing."""
        key = _parse_id(qna_id)
        if key is None:
            # A start of an id, as `qna show` takes one: said, or it reads as "no such
            # record" of one that is there.
            if isinstance(qna_id, str) and _id_prefix_digits(qna_id.strip()):
                raise NotFound(
                    f"No question with id {qna_id}: that is the start of an id at most; "
                    "give the whole id (32 hex digits, hyphens or none)."
                )
            raise NotFound(f"No question with id {qna_id}.")
        return key

    def _find(self, qnas: QnARepository, wanted: UUID | IdStart) -> QnA | None:
        return qnas.get(wanted) if isinstance(wanted, UUID) else None


#: The fewest hex digits of an id that `FindQnA` takes as a start of one (as git
#: takes a commit's): fewer would too often mean a mistyped or cut-off id.
MIN_ID_PREFIX = 4


@dataclass(frozen=True)
class IdStart:
    """The start of an id, as a person types it (`3f0c2c4e`): its hex digits."""

    digits: str
    #: As it was given, for messages.
    text: str


class FindQnA(GetQnA):
    """One record, by its full id or by a start of it that no other record's id has
    (`3f0c2c4e`, read off `qna history`): for people, who type ids. The HTTP API and
    `qna.Client.get` take full ids only, so that a program's reference to a record
    cannot come to mean another."""

    @staticmethod
    def parse(qna_id: UUID | str) -> UUID | IdStart:
        """What `qna_id` names, checked before any database is asked:
        InvalidArgument for a start too short, NotFound for what is not an id."""
        if not isinstance(qna_id, str) or _parse_id(qna_id) is not None:
            return GetQnA.parse(qna_id)
        text = qna_id.strip()
        digits = _id_prefix_digits(text)
        if digits is None:
            raise NotFound(f"No question with id {qna_id}.")
        if len(digits) < MIN_ID_PREFIX:
            given = f", not {text}." if text else "."
            raise InvalidArgument(f"Give at least {MIN_ID_PREFIX} characters of the id{given}")
        return IdStart(digits, text)

    def _find(self, qnas: QnARepository, wanted: UUID | IdStart) -> QnA | None:
        if isinstance(wanted, UUID):
            return super()._find(qnas, wanted)
        first = UUID(wanted.digits.ljust(32, "0"))
        last = UUID(wanted.digits.ljust(32, "f"))
        found = qnas.list_by_id(first=first, last=last, limit=2)
        if len(found) > 1:
            raise AmbiguousId(
                f"More than one question has an id starting {wanted.text} "
                f"({found[0].id}, {found[1].id}); give more of it."
            )
        if not found:
            raise NotFound(f"No question has an id starting {wanted.text}.")
        return found[0]


@dataclass(frozen=True)
class Page:
    """One page of history, newest first."""

    items: Sequence[QnA]
    #: Pass back as `cursor` to get the next (older) page; None on the last page.
    next_cursor: str | None


class ListQnA(_ReadsHistory):
    """The history, newest first, a page at a time (keyset pagination); with `status`,
    only the records in it — as readers see them: a record whose asker died mid-ask is
    failed (abandoned), not pending, whether or not that was stored yet."""

    DEFAULT_LIMIT = 20
    MAX_LIMIT = 100

    def __call__(
        self,
        *,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
        status: Status | str | None = None,
    ) -> Page:
        # bool is an int to Python, and 1.5 passes a range check: neither is a limit.
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= self.MAX_LIMIT
        ):
            raise InvalidArgument(f"limit must be an integer from 1 to {self.MAX_LIMIT}.")
        # "" is no cursor a page gave out, not the first page: a caller paging on
        # with one would start over, for ever.
        before = decode_cursor(cursor) if cursor is not None else None
        wanted = parse_status(status) if status is not None else None
        # One instant for what the query counts as abandoned and what is reported so.
        now = self._clock()
        with self._uow() as uow:
            # One extra row tells whether another page follows without a COUNT.
            rows = list(
                uow.qnas.list(
                    limit=limit + 1,
                    before=before,
                    status=wanted,
                    abandoned=Abandonment(now, self._abandon_after),
                )
            )
        self._report_abandoned(rows, now=now)
        items = rows[:limit]
        has_more = len(rows) > limit
        return Page(items=items, next_cursor=encode_cursor(items[-1]) if has_more else None)


class ReapAbandoned(_ReadsHistory):
    """Mark as failed every record whose asker died mid-ask (run at server start)."""

    BATCH = 500

    def __call__(self) -> int:
        closed = 0
        while True:
            abandoned = Abandonment(self._clock(), self._abandon_after)
            with self._uow() as uow:
                stale = uow.qnas.list_pending(abandoned=abandoned, limit=self.BATCH)
                closed += _close_abandoned(uow, stale, abandoned)
            if len(stale) < self.BATCH:
                return closed


def _close_abandoned(uow: UnitOfWork, records: Sequence[QnA], abandoned: Abandonment) -> int:
    """A pending record older than any ask can last is reported, and stored, as failed.

    Only if it is still pending when written: an answer that landed since it was read
    stands, and the record given is brought up to date. Returns how many were closed.
    """
    closed = 0
    for qna in records:
        if not qna.is_abandoned(abandoned):
            continue
        qna.abandon(now=abandoned.now)
        if uow.qnas.close_pending(qna):
            closed += 1
            continue
        stored = uow.qnas.get(qna.id)
        if stored is not None:
            for name in OUTCOME_FIELDS:
                setattr(qna, name, getattr(stored, name))
    if closed:
        uow.commit()
    return closed


def parse_status(status: Status | str) -> Status:
    """A status as given by a caller: one of Status, or its value."""
    try:
        return Status(status)
    except ValueError:
        pass
    names = ", ".join(member.value for member in Status)
    raise InvalidArgument(f"status must be one of {names}.")


def encode_cursor(qna: QnA) -> str:
    raw = json.dumps([qna.created_at.isoformat(), str(qna.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_MAX_CURSOR_LENGTH = 200


def decode_cursor(cursor: str) -> PageKey:
    refused = InvalidCursor("The cursor is not one this service gave out.")
    if not isinstance(cursor, str) or len(cursor) > _MAX_CURSOR_LENGTH:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
        if not (
            isinstance(decoded, list)
            and len(decoded) == 2
            and all(isinstance(part, str) for part in decoded)
        ):
            raise refused
        key = PageKey(created_at=datetime.fromisoformat(decoded[0]), id=UUID(decoded[1]))
        if key.created_at.tzinfo is None:
            raise refused
        # Extreme offsets (9999-12-31T23:59-23:59) overflow when moved to UTC.
        key.created_at.astimezone(UTC)
    except (binascii.Error, ValueError, TypeError, OverflowError) as exc:
        raise refused from exc
    return key


def _fingerprint(question: str, fresh: bool) -> str:
    return hashlib.sha256(json.dumps([question, fresh]).encode()).hexdigest()


def _parse_id(qna_id: UUID | str) -> UUID | None:
    if isinstance(qna_id, UUID):
        return qna_id
    try:
        # Whitespace around it (copied from a terminal or a log line) is no part of it.
        return UUID(qna_id.strip())
    except (ValueError, TypeError, AttributeError):
        return None


# Where an id's canonical form has hyphens ("-") and hex digits ("x"); without its
# hyphens, an id is 32 hex digits (which `UUID` takes too).
_ID_FORM = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_HEX_DIGITS = frozenset("0123456789abcdef")


def _id_prefix_digits(text: str) -> str | None:
    """The hex digits of `text` if it is a start of an id's canonical form, or of
    its hex digits alone, in any case ("" for "")."""
    text = text.lower()
    form = _ID_FORM if "-" in text else _ID_FORM.replace("-", "")
    if len(text) > len(form):
        return None
    for char, slot in zip(text, form, strict=False):
        if (char == "-") != (slot == "-") or (slot == "x" and char not in _HEX_DIGITS):
            return None
    return text.replace("-", "")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)
