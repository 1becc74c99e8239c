"""The QnA record and the rules about questions. Plain Python, no I/O."""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID, uuid4

from qna.domain.errors import InvalidQuestion, LLMError

DEFAULT_MAX_QUESTION_LENGTH = 4000
# Model names as stored (the one asked for and the one that answered).
MAX_MODEL_LENGTH = 200
# Token counts as stored: a 32-bit signed integer column.
MAX_TOKEN_COUNT = 2**31 - 1
# Why the LLM stopped, as stored: a provider's word ("stop", "length", ...).
MAX_FINISH_REASON_LENGTH = 64
#: Finish reasons that say the answer is not whole: the model ran into its token limit
#: ("length") or the provider's filter cut it ("content_filter"). OpenAI's words, which
#: OpenAI-compatible servers (Ollama, vLLM) use too.
CUT_OFF_REASONS = frozenset({"length", "content_filter"})

# Newline and tab are how people format questions; every other control character
# (NUL above all) is a sign of a broken or hostile client.
_ALLOWED_CONTROLS = frozenset("\n\t")


class Status(enum.StrEnum):
    """Where a record is: asked and waiting for the LLM, answered, or failed."""

    PENDING = "pending"
    ANSWERED = "answered"
    FAILED = "failed"


def parse_question(text: str, *, max_length: int = DEFAULT_MAX_QUESTION_LENGTH) -> str:
    """Return the question as it is stored, or raise InvalidQuestion saying what is wrong."""
    if not isinstance(text, str):
        raise InvalidQuestion("The question must be a string.")
    # Browsers send textarea line breaks as CRLF; store one convention. A byte-order
    # mark (a file saved by a Windows editor, piped in) is no part of the question:
    # kept, the same question typed in would not match it, in the cache or a search.
    question = _strip(text.replace("\r\n", "\n").replace("\r", "\n"))
    if not any(_is_visible(char) for char in question):
        raise InvalidQuestion("The question is empty.")
    if len(question) > max_length:
        raise InvalidQuestion(
            f"The question is {len(question)} characters long; the limit is {max_length}."
        )
    for position, char in enumerate(question):
        if char in _ALLOWED_CONTROLS:
            continue
        category = unicodedata.category(char)
        if category == "Cc":
            raise InvalidQuestion(
                f"The question contains a control character (U+{ord(char):04X}) "
                f"at position {position}."
            )
        if category == "Cs":
            raise InvalidQuestion(f"The question contains a lone surrogate at position {position}.")
    return question


def _strip(text: str) -> str:
    """Without surrounding whitespace and byte-order marks."""
    stripped = text.strip()
    while stripped[:1] == "\ufeff" or stripped[-1:] == "\ufeff":
        stripped = stripped.strip("\ufeff").strip()
    return stripped


def _is_visible(char: str) -> bool:
    # Zero-width and other format characters (U+200B, U+FEFF) alone are not a question.
    return not char.isspace() and unicodedata.category(char) not in {"Cf", "Zs", "Zl", "Zp"}


def normalise_for_cache(question: str) -> str:
    """The form under which two questions count as the same: case and spacing ignored,
    and the ways Unicode has of writing one letter (é as one code point, or as e and a
    combining accent, as macOS may send it): Unicode's canonical caseless match. In
    NFC, so that text typed in NFC (nearly all) keeps the key it had before."""
    folded = unicodedata.normalize("NFD", question).casefold()
    return " ".join(unicodedata.normalize("NFC", folded).split())


@dataclass
class QnA:
    """One question and what became of it.

    Only the fields in `OUTCOME_FIELDS` change once a record is stored; the question,
    model, times asked, source and idempotency key are fixed when it is asked.
    """

    question: str
    #: The model asked for; answers are cached per requested model.
    model: str
    created_at: datetime
    id: UUID = field(default_factory=uuid4)
    status: Status = Status.PENDING
    answer: str | None = None
    #: The model the provider says answered (often a dated snapshot of `model`).
    response_model: str | None = None
    error_kind: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Why the LLM stopped, as it said ("stop": the answer is whole; see
    #: `CUT_OFF_REASONS`); None when it did not say, or the record is not answered.
    finish_reason: str | None = None
    latency_ms: int | None = None
    answered_at: datetime | None = None
    #: Set when the answer was served from an earlier record instead of the LLM.
    source_id: UUID | None = None
    #: A client's retry key; unique among stored records while it is held.
    idempotency_key: str | None = None
    #: Tells whether a retry with the same key is the same request.
    request_fingerprint: str | None = None
    #: When, still pending, it counts as abandoned: past its asker's own deadline, as
    #: that asker was configured (another process may allow asks less time). Unset in
    #: records stored before qna kept it: those are judged by the reader's deadline.
    abandon_at: datetime | None = None

    @classmethod
    def ask(
        cls, question: str, *, model: str, now: datetime, abandon_after: timedelta | None = None
    ) -> QnA:
        qna = cls(question=question, model=model, created_at=now)
        if abandon_after is not None:
            qna.restamp(now, abandon_after=abandon_after)
        return qna

    def restamp(self, now: datetime, *, abandon_after: timedelta) -> None:
        """Asked at `now` (not yet stored): a retry that waited is asked when it asks."""
        self.created_at = now
        self.abandon_at = now + abandon_after

    def record_answer(
        self,
        *,
        answer: str,
        model: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        latency_ms: int,
        now: datetime,
        finish_reason: str | None = None,
    ) -> None:
        self._require_pending()
        self.status = Status.ANSWERED
        self.answer = answer
        self.response_model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.finish_reason = finish_reason
        self.latency_ms = latency_ms
        self.answered_at = now

    def record_cached(self, source: QnA, *, now: datetime) -> None:
        # The SQL store does this inside its INSERT (repository._ANSWERED_FROM_CACHE);
        # its tests compare the row it stores with what this method makes.
        self._require_pending()
        self.status = Status.ANSWERED
        self.answer = source.answer
        self.response_model = source.response_model
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = source.finish_reason
        self.latency_ms = 0
        self.answered_at = now
        self.source_id = source.id

    def record_failure(self, error: LLMError, *, latency_ms: int | None, now: datetime) -> None:
        self._require_pending()
        self.status = Status.FAILED
        self.error_kind = error.code
        self.error_message = error.message
        self.latency_ms = latency_ms
        self.answered_at = now

    @property
    def is_cut_off(self) -> bool:
        """Answered, but not with a whole answer: the LLM stopped short (`CUT_OFF_REASONS`)."""
        return self.status is Status.ANSWERED and self.finish_reason in CUT_OFF_REASONS

    def is_abandoned(self, abandonment: Abandonment) -> bool:
        """Still pending long after its ask could have finished: its asker died. Past
        its own `abandon_at`, or, for a record that does not say, created longer ago
        than `abandonment.after`."""
        if self.status is not Status.PENDING:
            return False
        if self.abandon_at is not None:
            return self.abandon_at < abandonment.now
        return self.created_at < abandonment.created_before

    def abandon(self, *, now: datetime) -> None:
        """Close a record whose asker died before the LLM answered."""
        self._require_pending()
        self.status = Status.FAILED
        self.error_kind = "abandoned"
        self.error_message = "The process handling this question stopped before it was answered."
        self.answered_at = now

    def _require_pending(self) -> None:
        if self.status is not Status.PENDING:
            raise ValueError(f"QnA {self.id} is already {self.status.value}")


@dataclass(frozen=True)
class Abandonment:
    """How a reader tells which pending records were abandoned, as of `now`: those past
    their own `abandon_at`, and those without one created more than `after` ago."""

    now: datetime
    after: timedelta

    @property
    def created_before(self) -> datetime:
        """The cut-off for records that carry no `abandon_at`."""
        return self.now - self.after


#: What becomes of an ask: the only fields of a stored QnA that `save` writes back.
OUTCOME_FIELDS = (
    "status",
    "answer",
    "response_model",
    "error_kind",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "latency_ms",
    "answered_at",
)
