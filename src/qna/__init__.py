"""qna: ask an LLM a question; every question, answer and failure is kept.

From Python::

    import qna

    with qna.connect() as client:
        print(client.ask("What is the capital of France?").answer)

See `qna.connect` and `qna.Client`. The command line is `qna --help`.
"""

from __future__ import annotations

# Every name below loads when it is first used, the errors too. `import qna` runs
# before the `qna` command's Ctrl-C handling can (the console script imports
# qna.entrypoints.console from this package): the ~60 ms its imports took were a
# window in which Ctrl-C printed a traceback. typing, too, is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from qna.application.use_cases import InvalidArgument, InvalidCursor, Page
    from qna.config import Settings
    from qna.domain import (
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
        QnA,
        QnAError,
        Status,
        StorageUnavailable,
    )
    from qna.entrypoints.library import Client, connect

__all__ = [
    "Client",
    "ConfigurationError",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReused",
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
    "InvalidArgument": "qna.application.use_cases",
    "InvalidCursor": "qna.application.use_cases",
    "Page": "qna.application.use_cases",
    # The rest are the domain's: plain Python, no adapter (SQLAlchemy, openai) loads.
    **{
        name: "qna.domain"
        for name in (
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
        )
    },
}


def __getattr__(name: str) -> Any:
    # The adapters (SQLAlchemy, openai) load only when the client is used, so
    # `import qna.domain` stays free of them.
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # looked up here once, then found as any attribute is
        return value
    raise AttributeError(f"module 'qna' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Without this, dir() and so help(qna) miss the lazy names: connect and Client.
    return sorted({*globals(), *__all__})
