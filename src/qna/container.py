"""The composition root: the one place that reads settings and builds things."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from dependency_injector import containers, providers
from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from qna.adapters.chat_completions import ChatCompletionsLLM
from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import UnknownConnectionOption, create_engine
from qna.adapters.sqlalchemy.repository import SqlAlchemyUnitOfWork, write_batches_for
from qna.adapters.structured_logging import configure_logging
from qna.application.ports import LLM
from qna.application.use_cases import (
    AskQuestion,
    FindQnA,
    GetQnA,
    ListQnA,
    ReapAbandoned,
    parse_ask,
)
from qna.config import ConfigurationError, Settings
from qna.domain.errors import StorageUnavailable


def engine_resource(
    url: str, pool_size: int, connect_timeout: float, statement_timeout: float
) -> Iterator[Engine]:
    """The engine and its pool, disposed of by `container.shutdown_resources()`."""
    try:
        engine = create_engine(
            url,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
        )
    except UnknownConnectionOption as exc:
        raise ConfigurationError(f"DATABASE_URL is not a URL qna can use: {exc}.") from exc
    # ImportError: a dialect SQLAlchemy knows but whose driver qna does not ship
    # (mysql://, for one).
    except (ArgumentError, NoSuchModuleError, ValueError, ImportError) as exc:
        raise ConfigurationError(
            "DATABASE_URL is not a database URL qna can use "
            "(expected postgresql://… or sqlite:///…)."
        ) from exc
    except OSError as exc:
        # The SQLite file's directory could not be made: a file in the way, a
        # read-only disk, no permission. As unavailable as a file that cannot be
        # opened; when no wait mends it, `qna serve` refuses to start (exit 6). A
        # full disk, an I/O error, may pass.
        reason = (exc.strerror or str(exc)).lower()
        raise StorageUnavailable(
            f"The database is unavailable: cannot create the directory {exc.filename}: {reason}",
            retryable=exc.errno not in _DIRECTORY_FOR_GOOD,
        ) from exc
    yield engine
    engine.dispose()


# Why a directory could not be made, that waiting does not change.
_DIRECTORY_FOR_GOOD = frozenset(
    {errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS}
)


def llm_resource(
    client: str,
    api_key: str | None,
    base_url: str | None,
    model: str,
    connect_timeout: float,
    request_timeout: float,
    deadline: float,
    max_attempts: int,
) -> Iterator[LLM]:
    """The LLM client and its connection pool, closed by `shutdown_resources()`."""
    check_llm_settings(client, api_key, base_url)
    try:
        llm = _llm_class(client)(
            api_key=api_key,
            base_url=base_url,
            model=model,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            deadline=deadline,
            max_attempts=max_attempts,
        )
    except ValueError as exc:
        # Every other value was checked with the settings; only the URL is left.
        raise ConfigurationError(f"OPENAI_BASE_URL cannot be used: {exc}") from exc
    yield llm
    llm.close()


def check_llm_settings(client: str, api_key: str | None, base_url: str | None) -> None:
    """Refuse what `llm_resource` would refuse, without building or importing a client
    (the URL itself was checked with the settings).

    `qna serve` checks this in gunicorn's master, which must not import the HTTP and
    TLS stacks: gevent workers monkey-patch them after the fork, and a module imported
    before that keeps the originals (urllib3 its `ssl.SSLContext`: every HTTPS ask
    then fails).
    """
    if api_key is None and base_url is None:
        raise ConfigurationError(
            "OPENAI_API_KEY is not set: export it, put it in .env, "
            "or set OPENAI_BASE_URL to an OpenAI-compatible server."
        )


def _llm_class(client: str) -> type[ChatCompletionsLLM]:
    # Imported here: the openai package takes about a second to import, which
    # `qna history`, `qna --help` and the migrations should not pay for.
    if client == "http":
        from qna.adapters.http_llm import HttpLLM

        return HttpLLM
    from qna.adapters.openai_llm import OpenAILLM

    return OpenAILLM


def cache_ttl(ttl_s: float) -> timedelta | None:
    return timedelta(seconds=ttl_s) if ttl_s > 0 else None


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


class Container(containers.DeclarativeContainer):
    config = providers.Configuration(strict=True)

    # flask-limiter's own lines too: its store unreachable, and answering again.
    logging = providers.Resource(
        configure_logging, level=config.log_level, loggers=("qna", "flask-limiter")
    )

    engine = providers.Resource(
        engine_resource,
        url=config.database_url,
        pool_size=config.db_pool_size,
        connect_timeout=config.db_connect_timeout_s,
        statement_timeout=config.db_statement_timeout_s,
    )
    #: Concurrent asks' writes, shared per process (adapters/sqlalchemy/batching.py).
    write_batches = providers.Singleton(write_batches_for, engine)
    unit_of_work = providers.Factory(SqlAlchemyUnitOfWork, engine=engine, batches=write_batches)

    llm = providers.Resource(
        llm_resource,
        client=config.llm_client,
        api_key=config.openai_api_key,
        base_url=config.openai_base_url,
        model=config.model,
        connect_timeout=config.llm_connect_timeout_s,
        request_timeout=config.llm_timeout_s,
        deadline=config.llm_deadline_s,
        max_attempts=config.llm_max_attempts,
    )

    abandon_after = providers.Callable(seconds, config.abandon_after_s)
    ask_question = providers.Factory(
        AskQuestion,
        uow=unit_of_work.provider,
        llm=llm,
        max_question_length=config.max_question_length,
        cache_ttl=providers.Callable(cache_ttl, config.cache_ttl_s),
        abandon_after=abandon_after,
        idempotency_ttl=providers.Callable(seconds, config.idempotency_ttl_s),
        in_flight_wait=providers.Callable(seconds, config.idempotency_wait_s),
        llm_deadline=providers.Callable(seconds, config.llm_deadline_s),
    )
    get_qna = providers.Factory(GetQnA, uow=unit_of_work.provider, abandon_after=abandon_after)
    find_qna = providers.Factory(FindQnA, uow=unit_of_work.provider, abandon_after=abandon_after)
    reap_abandoned = providers.Factory(
        ReapAbandoned, uow=unit_of_work.provider, abandon_after=abandon_after
    )
    #: True when the database answers and its schema is at the newest migration.
    schema_ready = providers.Callable(migrate.is_at_head, engine)
    list_qna = providers.Factory(ListQnA, uow=unit_of_work.provider, abandon_after=abandon_after)


def create_container(settings: Settings | None = None) -> Container:
    """Build the container from `settings`, or from the environment and `.env`."""
    settings = settings if settings is not None else Settings()
    container = Container()
    values = settings.model_dump()
    values["database_url"] = settings.effective_database_url
    values["abandon_after_s"] = settings.abandon_after_s
    values["api_tokens"] = settings.tokens
    values["cors_origins"] = settings.cors_origin_list
    values["openai_api_key"] = (
        settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    )
    container.config.from_dict(values)
    return container


def ask_question_for(
    container: Container, question: str, *, fresh: object = False, **overrides: Any
) -> AskQuestion:
    """The container's AskQuestion (`overrides` as for its provider). If a setting it
    needs is missing (no API key), an invalid `question` (or `fresh`) is still refused
    first: no setting mends it. Only then: a built use case checks the ask itself, and
    an ask does not pay for it twice."""
    try:
        ask_question: AskQuestion = container.ask_question(**overrides)
    except ConfigurationError:
        parse_ask(question, fresh=fresh, max_length=container.config.max_question_length())
        raise
    return ask_question


def interruptible_database_waits(container: Container) -> None:
    """For the command line only (process-wide): a Ctrl-C while it waits for
    PostgreSQL (a statement behind a lock) ends the command at once, not when the
    statement does (`adapters/sqlalchemy/interruptible.py`)."""
    url = container.config.database_url()
    if url and url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
        from qna.adapters.sqlalchemy.interruptible import make_psycopg_interruptible

        make_psycopg_interruptible()


def rebuilt(container: Container) -> Container:
    """A container of `container`'s settings, none of whose resources are built yet."""
    fresh = Container()
    fresh.config.from_dict(container.config())
    return fresh


def warm_up(container: Container) -> None:
    """Build the shared resources now, before threads share the container.

    dependency-injector's Resource providers do not lock: a burst of first requests
    would each build an engine and an LLM client, and only the last one would be
    closed. A missing API key is left for the first ask to report. So is a database
    that may come back (a SQLite directory on a full disk, say): in `qna serve`'s
    workers the first request builds the engine, one at a time (the app's schema
    guard), and is told 503 until then — the worker does not die of it.
    """
    try:
        container.engine()
    except StorageUnavailable as exc:
        if not exc.retryable:
            raise
    with contextlib.suppress(ConfigurationError):
        container.llm()


MigrationLockBusy = migrate.MigrationLockBusy


def upgrade_database(container: Container, *, patient: bool = True) -> None:
    """Bring the schema to the newest migration (safe to call from many processes).
    Not `patient`: one try for a lock on the table, not several (a request waits)."""
    migrate.upgrade(container.engine(), lock_attempts=None if patient else 1)


def shutdown(container: Container) -> None:
    container.shutdown_resources()
