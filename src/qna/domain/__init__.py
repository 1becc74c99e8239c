"""The heart of qna: the QnA record, the rules about questions, and the errors. No I/O."""

from qna.domain.errors import (
    ConfigurationError,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidQuestion,
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
    NotFound,
    OutcomeNotStored,
    QnAError,
    StorageUnavailable,
)
from qna.domain.model import DEFAULT_MAX_QUESTION_LENGTH, QnA, Status, parse_question

__all__ = [
    "DEFAULT_MAX_QUESTION_LENGTH",
    "ConfigurationError",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReused",
    "InvalidQuestion",
    "LLMBadResponse",
    "LLMError",
    "LLMRateLimited",
    "LLMRefused",
    "LLMTimeout",
    "LLMUnavailable",
    "NotFound",
    "OutcomeNotStored",
    "QnA",
    "QnAError",
    "Status",
    "StorageUnavailable",
    "parse_question",
]
