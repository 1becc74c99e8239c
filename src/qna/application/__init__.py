"""Use cases and the ports they depend on."""

from qna.application.ports import LLM, Completion, PageKey, QnARepository, UnitOfWork
from qna.application.use_cases import (
    Asked,
    AskQuestion,
    FindQnA,
    GetQnA,
    InvalidArgument,
    InvalidCursor,
    ListQnA,
    Page,
)

__all__ = [
    "LLM",
    "AskQuestion",
    "Asked",
    "Completion",
    "FindQnA",
    "GetQnA",
    "InvalidArgument",
    "InvalidCursor",
    "ListQnA",
    "Page",
    "PageKey",
    "QnARepository",
    "UnitOfWork",
]
