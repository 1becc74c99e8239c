"""qna: ask an LLM a question; every question, answer and failure is kept.

From Python::

    import qna

    with qna.connect() as client:
        print(client.ask("What is the capital of France?").answer)

See `qna.connect` and `qna.Client`. The command line is `qna --help`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qna.application.use_cases import InvalidArgument, InvalidCursor
from qna.domain import (
    InvalidQuestion,
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
    NotFound,
    OutcomeNotStored,
    QnA,
    QnAError,
    Status,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from qna.application.use_cases import Page
    from qna.config import ConfigurationError, Settings
    from qna.entrypoints.library import Client, connect

__all__ = [
    "Client",
    "ConfigurationError",
    "InvalidArgument",
    "InvalidCursor",
    "InvalidQuestion",
    "LLMBadResponse",
    "LLMError",
    "LLMRateLimited",
    "LLMRefused",
    "LLMTimeout",
    "LLMUnavailable",
    "NotFound",
    "OutcomeNotStored",
    "Page",
    "QnA",
    "QnAError",
    "Settings",
    "Status",
    "StorageUnavailable",
    "connect",
]

_LAZY = {
    "Client": "qna.entrypoints.library",
    "connect": "qna.entrypoints.library",
    "Settings": "qna.config",
    "ConfigurationError": "qna.config",
    "Page": "qna.application.use_cases",
}


def __getattr__(name: str) -> Any:
    # The adapters (SQLAlchemy, openai) load only when the client is used, so
    # `import qna.domain` stays free of them.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qna' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Without this, dir() and so help(qna) miss the lazy names: connect and Client.
    return sorted({*globals(), *__all__})
