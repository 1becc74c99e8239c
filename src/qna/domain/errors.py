"""Errors the core raises. Entry points map each class to an HTTP status or an exit code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from qna.domain.model import QnA


class QnAError(Exception):
    """Base of every error the core raises on purpose."""

    #: A stable, machine-readable name; stored with failed asks and sent to clients.
    code: str = "qna_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle's default remakes an exception by calling its class with `args` alone,
        # which a subclass that takes more (OutcomeNotStored's record) refuses: a
        # ProcessPoolExecutor then reports a broken pool instead of the error. So it is
        # remade without __init__, from its args (the same str()) and its attributes.
        return (_unpickle, (type(self), self.args), self.__dict__)


def _unpickle(cls: type[QnAError], args: tuple[Any, ...]) -> QnAError:
    return cls.__new__(cls, *args)


class ConfigurationError(QnAError):
    """A setting is missing or wrong. The message names the variable to fix.

    A QnAError, so that one `except qna.QnAError` covers all that qna refuses. Here,
    not with the settings: an adapter finds some settings wrong only when it uses them
    (the database refusing DATABASE_URL's login)."""

    code = "misconfigured"


class InvalidQuestion(QnAError):
    """The question is empty, too long, or has control characters; nothing is stored."""

    code = "invalid_question"


class NotFound(QnAError):
    """No stored record has this id."""

    code = "not_found"


class IdempotencyKeyReused(QnAError):
    """The key was used before with a different request."""

    code = "idempotency_key_reused"


class IdempotencyKeyInFlight(QnAError):
    """The first request with this key is still being answered."""

    code = "idempotency_key_in_flight"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds after which a retry (which waits for the first request itself) will
        #: outlast that request's deadline, when it is known.
        self.retry_after = retry_after


class StorageUnavailable(QnAError):
    """The database could not be reached or refused the work."""

    code = "database_unavailable"

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        #: Whether trying again later may succeed: not for a file that is not a
        #: database, or a schema qna does not know, which wait for a person.
        self.retryable = retryable


class DatabaseLoginRefused(ConfigurationError, StorageUnavailable):
    """The database refused qna's login (a wrong password or user name, no pg_hba.conf
    entry for it, a database name the server does not have): DATABASE_URL is wrong,
    which no wait mends, so it is told as any wrong setting is. A StorageUnavailable
    too, not retryable: an answer the database then will not store still reaches the
    asker (OutcomeNotStored), and code that catches StorageUnavailable for a database
    it cannot use goes on catching it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class OutcomeNotStored(StorageUnavailable):
    """The LLM answered (or failed), but the database would not take the outcome.

    The stored record stays pending until it is closed as abandoned. The outcome
    travels with the error instead, so that an answer already paid for still
    reaches whoever asked."""

    def __init__(
        self,
        message: str,
        qna: QnA,
        *,
        retryable: bool = True,
        llm_error: LLMError | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        #: The record as the ask left it (answered, or failed), not as stored.
        self.qna = qna
        #: Why the LLM failed, when the outcome not stored is a failure: the reason
        #: there is no answer, which this error's own message (the database's) is not.
        self.llm_error = llm_error

    def both_failures(self, llm_error: LLMError) -> str:
        """One message for `llm_error` and this error: the LLM's failure first (why
        there is no answer), then the database's (why the record says pending)."""
        return (
            f"{llm_error.message} (not stored, the database failed too: {self.message}; "
            f"record {self.qna.id} stays pending)"
        )


class LLMError(QnAError):
    """The LLM did not produce an answer. Subclasses say why."""

    code = "llm_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the provider asked us to wait, when it said so.
        self.retry_after = retry_after
        #: The stored (failed) record, once the ask has been recorded.
        self.qna_id: UUID | None = None


class LLMUnavailable(LLMError):
    """Connection refused or reset, or the provider answered 5xx."""

    code = "llm_unavailable"


class LLMTimeout(LLMError):
    """The provider did not answer in time, and retries within the deadline did not help."""

    code = "llm_timeout"


class LLMRateLimited(LLMError):
    """The provider rate-limited the request (429), and retries did not get through."""

    code = "llm_rate_limited"


class LLMRefused(LLMError):
    """The provider rejected the request itself: bad key, unknown model, bad request."""

    code = "llm_refused"


class LLMBadResponse(LLMError):
    """The provider answered, but not with a usable completion."""

    code = "llm_bad_response"


LLM_ERRORS: dict[str, type[LLMError]] = {
    cls.code: cls
    for cls in (LLMError, LLMUnavailable, LLMTimeout, LLMRateLimited, LLMRefused, LLMBadResponse)
}
