"""qna from Python: `qna.connect()` builds the service and returns a `Client`.

import qna

with qna.connect() as client:           # settings from the environment / .env
    record = client.ask("What is the capital of France?")
    print(record.answer)
    for past in client.history(limit=10).items:
        print(past.question, "->", past.answer)
"""

from __future__ import annotations

import os
import warnings
from types import TracebackType
from typing import Any, Self
from uuid import UUID

from qna.application.use_cases import ListQnA, Page, parse_idempotency_key
from qna.config import Settings, load_settings, misread_variables, setting_field
from qna.container import (
    Container,
    ask_question_for,
    create_container,
    rebuilt,
    shutdown,
    upgrade_database,
    warm_up,
)
from qna.domain.model import QnA, Status


class Client:
    """Ask questions and read the history. Thread-safe; close it (or use `with`) when done.

    A child process forked with it (multiprocessing, a ProcessPoolExecutor) may use it
    too: it opens connections of its own there.

    Once closed, every method but `close` raises RuntimeError: the container would
    otherwise build a new engine and LLM client on the next call, and nothing would
    close those.
    """

    def __init__(self, container: Container) -> None:
        self._container = container
        self._closed = False
        #: The process whose connections the container's pools hold.
        self._pid = os.getpid()

    def ask(self, question: str, *, fresh: bool = False, idempotency_key: str | None = None) -> QnA:
        """Ask, store and return the answered record.

        With an `idempotency_key` (as HTTP's Idempotency-Key header), asking again with
        the same key and question returns the stored answer and asks the LLM once,
        also from another process at the same moment: a batch run again pays for
        nothing twice. A failed ask frees its key.

        Raises `qna.InvalidQuestion`, or `qna.InvalidArgument` for a `fresh` that is
        not a bool or a malformed key, before anything is stored; a subclass of
        `qna.LLMError` (after the failure is stored) when the LLM does not answer;
        `qna.IdempotencyKeyReused` when the key was used with another question, and
        `qna.IdempotencyKeyInFlight` when its first ask is still being answered after
        QNA_IDEMPOTENCY_WAIT_S; `qna.OutcomeNotStored` carries the answer the
        database would not take.
        """
        container = self._open()
        if idempotency_key is not None:
            parse_idempotency_key(idempotency_key, name="idempotency_key")
        # No API key: an invalid question is still said first, as `qna ask` says it.
        ask_question = ask_question_for(container, question, fresh=fresh)
        return ask_question(question, fresh=fresh, idempotency_key=idempotency_key)

    def get(self, qna_id: UUID | str) -> QnA:
        """One stored record, by its full id; raises `qna.NotFound`."""
        return self._open().get_qna()(qna_id)

    def history(
        self,
        *,
        limit: int = ListQnA.DEFAULT_LIMIT,
        cursor: str | None = None,
        status: Status | str | None = None,
    ) -> Page:
        """Newest first; pass `page.next_cursor` back as `cursor` for older records.
        With `status` (a `qna.Status` or its value), only the records in it: an ask
        whose process died mid-ask is failed, not pending.

        Raises `qna.InvalidArgument` when `limit` is not an integer from 1 to 100 or
        `status` is none of "pending", "answered", "failed", and its subclass
        `qna.InvalidCursor` when `cursor` is not of the form a page gives out.
        """
        return self._open().list_qna()(limit=limit, cursor=cursor, status=status)

    def close(self) -> None:
        """Close the database pool and the LLM client; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            # Inherited through a fork and never used here: its connections are the
            # parent's, still in use there (closing a PostgreSQL one ends its session).
            if self._pid == os.getpid():
                shutdown(self._container)

    def __enter__(self) -> Self:
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> Container:
        if self._closed:
            raise RuntimeError("This qna.Client is closed; call qna.connect() for a new one.")
        if self._pid != os.getpid():
            self._own_connections()
        return self._container

    def _own_connections(self) -> None:
        """In a child forked with this Client (multiprocessing, a ProcessPoolExecutor):
        the pools' connections are the parent's sockets, and asks sent over them from
        both processes at once interleave, on the LLM's connection and the database's.
        This process builds its own from the same settings and leaves the inherited ones
        alone: used, or closed, they are the parent's (psycopg2 closes no connection of
        another process when it is collected; a socket closed here stays open there)."""
        self._container = rebuilt(self._container)
        warm_up(self._container)
        self._pid = os.getpid()


def connect(settings: Settings | None = None, /, **overrides: Any) -> Client:
    """Build qna from `settings` (default: the environment and `.env`), migrate, return a Client.

    Keyword overrides use the settings' names, e.g.
    `connect(database_url="sqlite:///qna.db", openai_base_url="http://localhost:11434/v1")`.

    A name that is not a setting is a TypeError, as for any Python function: ignored,
    a misspelt `database_url` would send the records to the default database. A
    variable that looks meant for a setting but is not its name (`QNA_MODLE`) is
    named in a UserWarning, as the command line names it on stderr.
    """
    # The .env file only when connect() reads the settings: a Settings object was
    # built with a file of its own choosing, or none.
    for line in misread_variables(".env" if settings is None else None):
        warnings.warn(line, UserWarning, stacklevel=2)
    container = create_container(load_settings(settings, **_by_field(settings, overrides)))
    try:
        upgrade_database(container)
        warm_up(container)
    except BaseException:
        shutdown(container)
        raise
    return Client(container)


def _by_field(settings: object, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` under the settings' own names: merged with a Settings object's
    values, a variable's name (`DATABASE_URL=`) lost to the object's `database_url`."""
    if settings is not None and not isinstance(settings, Settings):
        raise TypeError(
            f"connect() takes a qna.Settings, not {type(settings).__name__}; "
            "give single settings by name, e.g. connect(database_url=...)"
        )
    by_field: dict[str, Any] = {}
    for name, value in overrides.items():
        field = setting_field(name, caller="connect()")
        if field in by_field:
            raise TypeError(f"connect() got the setting {field!r} twice, by two of its names")
        by_field[field] = value
    return by_field
