"""`import qna` as a Python program uses it: connect, ask, read back, handle failures."""

from __future__ import annotations

import multiprocessing
import os
import pydoc
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import create_engine, text

import qna
from tests.e2e.helpers import stored_rows
from tests.support.databases import WRONG_PASSWORD, with_wrong_password
from tests.support.fake_openai import DEFAULT_ANSWER, Delay, FakeOpenAI, Raw, Status, Step

QUESTION = "What is the capital of France?"


@pytest.fixture
def client(fake_openai: FakeOpenAI, database_url: str) -> Iterator[qna.Client]:
    with qna.connect(
        database_url=database_url,
        openai_base_url=fake_openai.base_url,
        llm_max_attempts=1,
        llm_timeout_s=0.3,
    ) as client:
        yield client


def test_ask_returns_the_stored_answered_record(
    client: qna.Client, fake_openai: FakeOpenAI, database_url: str
) -> None:
    record = client.ask(QUESTION)

    assert isinstance(record, qna.QnA)
    assert record.status is qna.Status.ANSWERED
    assert record.answer == DEFAULT_ANSWER
    assert record.question == QUESTION
    assert record.prompt_tokens == len(QUESTION.split())
    assert record.latency_ms is not None and record.latency_ms >= 0
    assert fake_openai.calls == 1
    [row] = stored_rows(database_url)
    assert (row["id"], row["status"]) == (record.id, "answered")


def test_get_returns_the_same_record(client: qna.Client) -> None:
    record = client.ask(QUESTION)

    assert client.get(record.id) == record
    assert client.get(str(record.id)) == record


def test_get_an_unknown_id_raises_not_found(client: qna.Client) -> None:
    with pytest.raises(qna.NotFound):
        client.get(uuid4())
    with pytest.raises(qna.NotFound):
        client.get("garbage")


def test_history_pages_newest_first(client: qna.Client) -> None:
    ids = [client.ask(f"Question number {n}?").id for n in range(5)]
    newest_first = ids[::-1]

    seen = []
    page = client.history(limit=2)
    seen.append([item.id for item in page.items])
    while page.next_cursor is not None:
        page = client.history(limit=2, cursor=page.next_cursor)
        seen.append([item.id for item in page.items])

    assert seen == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    assert [item.id for item in client.history().items] == newest_first


def test_history_by_status(client: qna.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Status(400))
    with pytest.raises(qna.LLMRefused) as refused:
        client.ask("Refused?")
    answered = client.ask("Answered?")

    failed = client.history(status="failed").items
    assert [item.id for item in failed] == [refused.value.qna_id]
    assert [item.id for item in client.history(status=qna.Status.ANSWERED).items] == [answered.id]
    assert list(client.history(status="pending").items) == []
    with pytest.raises(qna.InvalidArgument, match="status must be one of"):
        client.history(status="FAILED")


def test_an_idempotency_key_asks_the_llm_once_and_replays_the_stored_record(
    client: qna.Client, fake_openai: FakeOpenAI, database_url: str
) -> None:
    # A batch run again with the same keys pays for no answer twice; there was no way
    # to say so from Python.
    first = client.ask(QUESTION, idempotency_key="batch-7:row-1")
    again = client.ask(QUESTION, idempotency_key="batch-7:row-1")

    assert again == first
    assert first.idempotency_key == "batch-7:row-1"
    assert fake_openai.calls == 1
    assert [row["id"] for row in stored_rows(database_url)] == [first.id]
    with pytest.raises(qna.IdempotencyKeyReused) as reused:
        client.ask("Another question?", idempotency_key="batch-7:row-1")
    assert reused.value.code == "idempotency_key_reused"
    assert fake_openai.calls == 1


def test_a_failed_ask_frees_its_idempotency_key(
    client: qna.Client, fake_openai: FakeOpenAI, database_url: str
) -> None:
    fake_openai.script(Status(503))
    with pytest.raises(qna.LLMUnavailable) as failed:
        client.ask(QUESTION, idempotency_key="k1")

    retried = client.ask(QUESTION, idempotency_key="k1")

    assert retried.status is qna.Status.ANSWERED
    assert retried.id != failed.value.qna_id
    assert fake_openai.calls == 2
    statuses = {row["id"]: row["status"] for row in stored_rows(database_url)}
    assert statuses == {failed.value.qna_id: "failed", retried.id: "answered"}


def test_an_ask_whose_key_is_still_being_answered_raises_in_flight(
    fake_openai: FakeOpenAI, database_url: str
) -> None:
    fake_openai.script(Delay(1.0))
    with (
        qna.connect(database_url=database_url, openai_base_url=fake_openai.base_url) as first,
        qna.connect(
            database_url=database_url,
            openai_base_url=fake_openai.base_url,
            idempotency_wait_s=0,
        ) as second,
        ThreadPoolExecutor(1) as pool,
    ):
        answering = pool.submit(first.ask, QUESTION, idempotency_key="k1")
        while not stored_rows(database_url):  # the first ask holds the key
            time.sleep(0.01)
        with pytest.raises(qna.IdempotencyKeyInFlight) as in_flight:
            second.ask(QUESTION, idempotency_key="k1")
        answered = answering.result()

    assert in_flight.value.retry_after is not None and in_flight.value.retry_after > 0
    assert answered.status is qna.Status.ANSWERED
    assert fake_openai.calls == 1


@pytest.mark.parametrize("key", ["", "has space", "a,b", "x" * 201, "caf\u00e9", 7])
def test_a_malformed_idempotency_key_raises_invalid_argument_and_stores_nothing(
    client: qna.Client, fake_openai: FakeOpenAI, database_url: str, key: object
) -> None:
    with pytest.raises(qna.InvalidArgument, match="idempotency_key must be one key of 1 to 200"):
        client.ask(QUESTION, idempotency_key=key)  # type: ignore[arg-type]

    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize("question", ["", "   ", "a\x00b", "x" * 4001])
def test_an_invalid_question_raises_and_stores_nothing(
    client: qna.Client, fake_openai: FakeOpenAI, database_url: str, question: str
) -> None:
    with pytest.raises(qna.InvalidQuestion):
        client.ask(question)

    assert stored_rows(database_url) == []
    assert client.history().items == []
    assert fake_openai.calls == 0


def test_the_question_length_limit_is_a_setting(fake_openai: FakeOpenAI, database_url: str) -> None:
    with qna.connect(
        database_url=database_url,
        openai_base_url=fake_openai.base_url,
        max_question_length=10,
    ) as client:
        assert client.ask("x" * 10).status is qna.Status.ANSWERED
        with pytest.raises(qna.InvalidQuestion, match="limit is 10"):
            client.ask("x" * 11)

    assert fake_openai.calls == 1


@pytest.mark.parametrize(
    ("step", "error", "error_kind"),
    [
        pytest.param(Status(503), qna.LLMUnavailable, "llm_unavailable", id="503"),
        pytest.param(Status(429), qna.LLMRateLimited, "llm_rate_limited", id="429"),
        pytest.param(Delay(3), qna.LLMTimeout, "llm_timeout", id="timeout"),
        pytest.param(Status(401), qna.LLMRefused, "llm_refused", id="401"),
        pytest.param(Raw(body=b"not json"), qna.LLMBadResponse, "llm_bad_response", id="junk"),
    ],
)
def test_an_llm_failure_raises_and_the_failure_is_kept(
    client: qna.Client,
    fake_openai: FakeOpenAI,
    step: Step,
    error: type[qna.LLMError],
    error_kind: str,
) -> None:
    fake_openai.script(step)

    with pytest.raises(error) as raised:
        client.ask(QUESTION)

    assert isinstance(raised.value, qna.LLMError)
    assert isinstance(raised.value, qna.QnAError)
    assert raised.value.code == error_kind
    assert raised.value.qna_id is not None
    failed = client.get(raised.value.qna_id)
    assert failed.status is qna.Status.FAILED
    assert failed.question == QUESTION
    assert failed.answer is None
    assert failed.error_kind == error_kind
    assert failed.error_message == raised.value.message
    assert [item.id for item in client.history().items] == [failed.id]


def test_an_answer_the_database_refuses_comes_with_the_error(
    fake_openai: FakeOpenAI, outcomes_refused: str
) -> None:
    with qna.connect(database_url=outcomes_refused, openai_base_url=fake_openai.base_url) as client:
        with pytest.raises(qna.OutcomeNotStored, match="No space left on device") as raised:
            client.ask(QUESTION)

        assert isinstance(raised.value, qna.StorageUnavailable)
        assert raised.value.qna.status is qna.Status.ANSWERED
        assert raised.value.qna.answer == DEFAULT_ANSWER
        assert client.get(raised.value.qna.id).status is qna.Status.PENDING
    assert fake_openai.calls == 1


def test_connect_reads_the_environment(
    fake_openai: FakeOpenAI, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("QNA_MODEL", "model-from-env")

    with qna.connect() as client:
        record = client.ask(QUESTION)

    assert record.model == "model-from-env"
    assert fake_openai.requests[0]["model"] == "model-from-env"
    [row] = stored_rows(database_url)
    assert row["id"] == record.id


def test_only_the_documented_variables_are_read_not_the_settings_own_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MODEL, LOG_LEVEL: other programs' variables, in the environment or a shared .env.
    for name in ("MODEL", "LOG_LEVEL", "API_TOKENS", "RATE_LIMIT", "CACHE_TTL"):
        monkeypatch.setenv(name, "not qna's")
    (tmp_path / ".env").write_text("CORS_ORIGINS=*\nDB_POOL_SIZE=0\nQNA_MODEL=from-dotenv\n")
    monkeypatch.chdir(tmp_path)

    settings = qna.Settings()

    assert settings == qna.Settings(model="from-dotenv", _env_file=None)
    assert (settings.log_level, settings.api_tokens, settings.cors_origins) == ("INFO", None, "")


def test_keyword_overrides_win_over_the_environment(
    fake_openai: FakeOpenAI, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@127.0.0.1:1/x")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("QNA_MODEL", "model-from-env")

    with qna.connect(
        database_url=database_url, openai_base_url=fake_openai.base_url, model="override"
    ) as client:
        record = client.ask(QUESTION)

    assert record.model == "override"
    assert [row["id"] for row in stored_rows(database_url)] == [record.id]


def test_connect_takes_a_settings_object(fake_openai: FakeOpenAI, database_url: str) -> None:
    settings = qna.Settings(database_url=database_url, openai_base_url=fake_openai.base_url)

    with qna.connect(settings, model="from-override") as client:
        record = client.ask(QUESTION)

    assert record.model == "from-override"
    assert fake_openai.requests[0]["model"] == "from-override"


def test_connect_reads_no_dot_env_for_a_settings_object_built_without_one(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not UTF-8: refused whenever it is read. connect() merged the object's values
    # with the overrides by building Settings again, which read the working
    # directory's .env the caller had opted out of.
    (tmp_path / ".env").write_bytes(b"QNA_MODEL=caf\xe9\n")
    monkeypatch.chdir(tmp_path)
    settings = qna.Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'x.db'}",
        openai_base_url=fake_openai.base_url,
    )

    with qna.connect(settings, model="from-override") as client:
        record = client.ask(QUESTION)

    assert record.model == "from-override"


# The Client a forked child inherits: a module's global, as a program's would be.
inherited: qna.Client | None = None


def ask_in_a_child(n: int) -> tuple[str, str | None, int]:
    assert inherited is not None
    record = inherited.ask(f"Question {n} from process {os.getpid()}?")
    return record.question, record.answer, len(inherited.history(limit=3).items)


def test_a_client_inherited_through_a_fork_works_in_each_process(
    client: qna.Client, fake_openai: FakeOpenAI, database_url: str
) -> None:
    # A Client made before multiprocessing (or a ProcessPoolExecutor) forks: the
    # children sent their asks over the parent's pooled connections, all at once,
    # interleaved on the same sockets. The LLM read "bad JSON", PostgreSQL a garbled
    # session it closed, under the parent too.
    global inherited
    client.ask(QUESTION)  # the pools now hold the parent's connections
    inherited = client
    try:
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=4, mp_context=fork) as pool:
            results = list(pool.map(ask_in_a_child, range(16)))
    finally:
        inherited = None

    for n, (question, answer, listed) in enumerate(results):
        assert question.startswith(f"Question {n} from process ")
        assert answer == DEFAULT_ANSWER
        assert listed >= 2  # the parent's ask and its own, at least
    [parents_connection, *childrens] = fake_openai.peers
    assert parents_connection not in childrens
    assert len(client.history(limit=100).items) == 17  # and the parent's still work
    assert len(stored_rows(database_url)) == 17


def close_in_a_child() -> None:
    assert inherited is not None
    inherited.close()


def sessions(url: str) -> set[int]:
    """The PostgreSQL sessions open on the database `url` names, but this look's own."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return set(
                connection.scalars(
                    text(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            )
    finally:
        engine.dispose()


def test_closing_an_inherited_client_in_a_child_leaves_the_parents_sessions(
    fake_openai: FakeOpenAI, postgres_url: str
) -> None:
    # A child that left `with qna.connect() as client:` closed the pool it had
    # inherited: PostgreSQL ended the sessions, which were the parent's.
    global inherited
    with qna.connect(database_url=postgres_url, openai_base_url=fake_openai.base_url) as client:
        client.history()  # the pool now holds a session of the parent's
        before = sessions(postgres_url)
        inherited = client
        try:
            child = multiprocessing.get_context("fork").Process(target=close_in_a_child)
            child.start()
            child.join(30)
        finally:
            inherited = None
        time.sleep(0.3)  # a session told to end is gone within milliseconds

        assert child.exitcode == 0
        assert before and sessions(postgres_url) == before


def test_no_api_key_and_no_base_url_is_a_configuration_error(database_url: str) -> None:
    with (
        pytest.raises(qna.ConfigurationError, match="OPENAI_API_KEY"),
        qna.connect(database_url=database_url) as client,
    ):
        client.ask(QUESTION)

    assert stored_rows(database_url) == []


@pytest.mark.parametrize(
    ("question", "fresh", "error"),
    [("   ", False, qna.InvalidQuestion), (QUESTION, "no", qna.InvalidArgument)],
    ids=["question", "fresh"],
)
def test_an_invalid_ask_is_refused_as_such_without_an_api_key_too(
    database_url: str, question: str, fresh: object, error: type[Exception]
) -> None:
    # Before: ConfigurationError, as if setting the key would have made "" a question.
    with qna.connect(database_url=database_url) as client, pytest.raises(error):
        client.ask(question, fresh=fresh)

    assert stored_rows(database_url) == []


def test_an_unreachable_database_raises_storage_unavailable(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(qna.StorageUnavailable):
        qna.connect(
            database_url="postgresql://u:p@127.0.0.1:1/x",
            openai_base_url=fake_openai.base_url,
            db_connect_timeout_s=2,
        )


def test_a_wrong_database_password_is_a_configuration_error(
    fake_openai: FakeOpenAI, postgres_url: str
) -> None:
    with pytest.raises(qna.ConfigurationError, match="DATABASE_URL") as raised:
        qna.connect(
            database_url=with_wrong_password(postgres_url), openai_base_url=fake_openai.base_url
        )

    assert "password authentication failed" in str(raised.value)
    assert WRONG_PASSWORD not in str(raised.value)
    # Still what it was, for code that catches it as such; but no wait will mend it.
    assert isinstance(raised.value, qna.StorageUnavailable)
    assert raised.value.retryable is False


def test_a_sqlite_directory_that_cannot_be_made_raises_storage_unavailable(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    (tmp_path / "data").write_text("not a directory")

    with pytest.raises(qna.StorageUnavailable, match="directory"):
        qna.connect(
            database_url=f"sqlite:///{tmp_path / 'data' / 'qna.db'}",
            openai_base_url=fake_openai.base_url,
        )


def test_an_in_memory_sqlite_database_is_a_configuration_error(fake_openai: FakeOpenAI) -> None:
    # Each thread's connection would hold a database of its own, without the table.
    with pytest.raises(qna.ConfigurationError, match="DATABASE_URL"):
        qna.connect(database_url="sqlite:///:memory:", openai_base_url=fake_openai.base_url)


def test_a_dot_env_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"QNA_MODEL=caf\xe9\n")

    with pytest.raises(qna.ConfigurationError, match=r"\.env"):
        qna.connect(database_url=f"sqlite:///{tmp_path / 'x.db'}")


def test_settings_read_dot_env_files_in_the_encoding_they_are_given(tmp_path: Path) -> None:
    latin = tmp_path / "latin.env"
    latin.write_bytes(b"QNA_MODEL=caf\xe9\n")
    broken = tmp_path / "broken.env"
    broken.write_bytes(b'QNA_CACHE_TTL=5\nDATABASE_URL="sqlite:///x.db\n')

    assert qna.Settings(_env_file=latin, _env_file_encoding="latin-1").model == "café"
    with pytest.raises(qna.ConfigurationError, match="not UTF-8 text: byte 0xe9"):
        qna.Settings(_env_file=latin)
    # The check of every line, for each of several files.
    with pytest.raises(qna.ConfigurationError, match="line 2 is not NAME=value"):
        qna.Settings(_env_file=[latin, broken], _env_file_encoding="latin-1")


def test_connect_validates_overrides_and_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(qna.ConfigurationError, match="QNA_LLM_MAX_ATTEMPTS"):
        qna.connect(database_url=f"sqlite:///{tmp_path / 'x.db'}", llm_max_attempts="abc")
    with pytest.raises(qna.ConfigurationError, match="QNA_MODEL"):
        qna.connect(qna.Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}"), model="")


def test_settings_built_directly_refuse_a_wrong_value_with_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydantic's ValidationError escaped here: a second error type, worded for pydantic.
    with pytest.raises(qna.ConfigurationError, match=r"^QNA_LLM_MAX_ATTEMPTS is invalid"):
        qna.Settings(llm_max_attempts="abc")
    monkeypatch.setenv("QNA_LLM_CLIENT", "curl")
    with pytest.raises(qna.ConfigurationError, match=r"^QNA_LLM_CLIENT is invalid"):
        qna.Settings()


def test_settings_show_no_password_or_key_in_their_repr_or_str(tmp_path: Path) -> None:
    # repr() and str() land in logs and tracebacks; the API key and tokens were starred,
    # DATABASE_URL's password and a gateway's key in OPENAI_BASE_URL's query were not.
    settings = qna.Settings(
        _env_file=None,
        database_url="postgresql://qna:Sup3rSecret@db:5432/qna",
        openai_base_url="https://user:hunter2@gw.example.com/v1?api-key=K3y",
        rate_limit_storage="memory://",
        openai_api_key="sk-0123456789",
        api_tokens="t0ken",
    )

    for shown in (repr(settings), str(settings)):
        for secret in ("Sup3rSecret", "hunter2", "K3y", "sk-0123456789", "t0ken"):
            assert secret not in shown
        assert "postgresql://qna:***@db:5432/qna" in shown
        assert "https://user:***@gw.example.com/v1?***" in shown
    assert settings.database_url == "postgresql://qna:Sup3rSecret@db:5432/qna"  # kept


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # SQLAlchemy takes these unencoded in a password; urlsplit ended the host there.
        ("postgresql://qna:s3cr#t/pw@db:5432/qna", "postgresql://qna:***@db:5432/qna"),
        ("postgresql://qna:pa?ss@db/qna", "postgresql://qna:***@db/qna"),
        ("postgresql://qna@db/qna?password=Sup3rSecret", "postgresql://qna@db/qna?***"),
        ("sqlite:////var/lib/qna/qna.db", "sqlite:////var/lib/qna/qna.db"),
    ],
)
def test_a_database_urls_password_is_starred_however_it_is_written(url: str, shown: str) -> None:
    settings = qna.Settings(_env_file=None, database_url=url)

    assert f"database_url='{shown}'" in repr(settings)


@pytest.mark.parametrize(
    ("setting", "variable"),
    [("llm_max_attempts", "QNA_LLM_MAX_ATTEMPTS"), ("cache_ttl_s", "QNA_CACHE_TTL")],
)
def test_true_or_false_for_a_number_is_a_configuration_error(setting: str, variable: str) -> None:
    # True is 1 to Python: llm_max_attempts=True was taken as one attempt.
    with pytest.raises(qna.ConfigurationError, match=rf"^{variable} is invalid: .*not True"):
        qna.Settings(_env_file=None, **{setting: True})


def test_every_error_qna_exports_is_a_qna_error() -> None:
    # One `except qna.QnAError` catches whatever qna refuses, a bad setting included.
    exported = [getattr(qna, name) for name in qna.__all__]
    errors = [item for item in exported if isinstance(item, type) and issubclass(item, Exception)]

    assert qna.ConfigurationError in errors
    assert [error for error in errors if not issubclass(error, qna.QnAError)] == []
    assert qna.ConfigurationError("x").code == "misconfigured"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "https://api.openai.com/v1",
        "http://[::1]:8000/v1",
        "HTTP://localhost:11434/v1",
        "https://user:secret@llm.example.com/v1",
    ],
)
def test_any_http_url_with_a_host_is_a_base_url(url: str) -> None:
    assert qna.Settings(openai_base_url=f" {url} ").openai_base_url == url


def test_a_base_url_without_a_host_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(qna.ConfigurationError, match="OPENAI_BASE_URL"):
        qna.connect(database_url=f"sqlite:///{tmp_path / 'x.db'}", openai_base_url="http://")


def test_a_misspelt_keyword_is_refused_not_ignored(tmp_path: Path) -> None:
    # Ignored, the typo sent the records to the default database in the home directory.
    with pytest.raises(TypeError, match=r"'databse_url'.*did you mean 'database_url'"):
        qna.connect(databse_url=f"sqlite:///{tmp_path / 'x.db'}", openai_base_url="http://x/v1")
    with pytest.raises(TypeError, match="'colour'"):
        qna.connect(database_url=f"sqlite:///{tmp_path / 'x.db'}", colour="blue")
    # Settings built directly, the other way in the README gives.
    with pytest.raises(TypeError, match=r"Settings\(\).*'DATABSE_URL'.*'DATABASE_URL'"):
        qna.Settings(DATABSE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    # A name in another case is the setting still, as pydantic-settings takes it.
    assert qna.Settings(Database_Url="sqlite:///y.db", _env_file=None).database_url == (
        "sqlite:///y.db"
    )
    assert not (tmp_path / "home").exists()


def test_settings_given_by_their_variable_names_are_accepted(
    fake_openai: FakeOpenAI, database_url: str
) -> None:
    with qna.connect(DATABASE_URL=database_url, OPENAI_BASE_URL=fake_openai.base_url) as client:
        assert client.ask(QUESTION).status is qna.Status.ANSWERED


def test_variable_names_override_a_settings_object(
    fake_openai: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    # Merged with the object's own values under the settings' names, the variable's
    # name lost: the records went to the object's database instead.
    settings = qna.Settings(
        database_url=f"sqlite:///{tmp_path / 'other.db'}", openai_base_url=fake_openai.base_url
    )

    with qna.connect(settings, DATABASE_URL=database_url, QNA_MODEL="from-override") as client:
        record = client.ask(QUESTION)

    assert record.model == "from-override"
    assert [row["id"] for row in stored_rows(database_url)] == [record.id]


def test_a_setting_given_by_both_names_is_a_type_error(tmp_path: Path) -> None:
    # One of the two was silently dropped.
    with pytest.raises(TypeError, match="database_url"):
        qna.connect(
            database_url=f"sqlite:///{tmp_path / 'a.db'}",
            DATABASE_URL=f"sqlite:///{tmp_path / 'b.db'}",
        )


def test_settings_given_a_setting_by_both_names_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="'model' twice"):
        qna.Settings(_env_file=None, model="a", QNA_MODEL="b")


def test_a_url_in_place_of_settings_is_a_clear_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"qna\.Settings.*database_url="):
        qna.connect(f"sqlite:///{tmp_path / 'x.db'}")  # type: ignore[arg-type]


def test_a_closed_client_refuses_to_work_and_closes_twice_quietly(
    fake_openai: FakeOpenAI, database_url: str
) -> None:
    with qna.connect(database_url=database_url, openai_base_url=fake_openai.base_url) as client:
        record = client.ask(QUESTION)
    client.close()  # again: nothing to do

    # Before, each call quietly built a new engine and LLM client that nobody closed.
    for call in (
        lambda: client.ask(QUESTION),
        lambda: client.get(record.id),
        lambda: client.history(),
        lambda: client.__enter__(),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert fake_openai.calls == 1
    assert len(stored_rows(database_url)) == 1


def test_bad_history_arguments_raise_errors_named_in_qna(client: qna.Client) -> None:
    assert issubclass(qna.InvalidCursor, qna.InvalidArgument)
    assert issubclass(qna.InvalidArgument, qna.QnAError)
    with pytest.raises(qna.InvalidArgument, match="limit"):
        client.history(limit=0)
    with pytest.raises(qna.InvalidArgument, match="limit"):
        client.history(limit="10")  # type: ignore[arg-type]
    with pytest.raises(qna.InvalidCursor):
        client.history(cursor="not a cursor")
    with pytest.raises(qna.InvalidCursor):
        client.history(cursor=123)  # type: ignore[arg-type]
    with pytest.raises(qna.InvalidCursor):  # no page gives it out; it was the first page
        client.history(cursor="")


@pytest.mark.parametrize("fresh", ["no", 0, None], ids=repr)
def test_a_fresh_that_is_not_a_bool_raises_invalid_argument_and_stores_nothing(
    client: qna.Client, fake_openai: FakeOpenAI, database_url: str, fresh: object
) -> None:
    # Before: fresh="no" was taken as true, and the cache skipped.
    with pytest.raises(qna.InvalidArgument, match="fresh must be True or False"):
        client.ask(QUESTION, fresh=fresh)  # type: ignore[arg-type]

    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


def test_help_and_dir_show_everything_qna_exports() -> None:
    # The client, connect and Settings load lazily; help(qna) listed none of them.
    assert set(qna.__all__) <= set(dir(qna))
    text = pydoc.render_doc(qna, renderer=pydoc.plaintext)
    for name in ("connect(", "class Client", "class Settings", "class Page"):
        assert name in text


def test_connect_warns_of_a_variable_that_looks_meant_for_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command line and `qna serve` named it; a program was told nothing, and
    # its model was the default.
    monkeypatch.setenv("QNA_API_TOKEN", "secret")
    (tmp_path / ".env").write_text("QNA_MODLE=gpt-4o\n")
    monkeypatch.chdir(tmp_path)

    with pytest.warns(UserWarning) as warned:
        qna.connect(database_url=f"sqlite:///{tmp_path / 'x.db'}").close()

    assert [str(w.message) for w in warned] == [
        "QNA_API_TOKEN is not a setting qna reads; did you mean QNA_API_TOKENS?",
        "QNA_MODLE is not a setting qna reads; did you mean QNA_MODEL?",
    ]
    assert warned[0].filename == __file__  # the caller's line, not qna's


@pytest.mark.parametrize("name", qna.__all__)
def test_every_exported_name_has_a_docstring_of_its_own(name: str) -> None:
    # help(qna.Settings) showed pydantic's "Base class for settings...", and
    # help(qna.NotFound) its base class's "Base of every error the core raises".
    exported = getattr(qna, name)
    own = vars(exported).get("__doc__") if isinstance(exported, type) else exported.__doc__
    assert own and own.strip()


def test_a_database_migrated_by_a_newer_qna_is_storage_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    qna.connect(database_url=url, openai_base_url="http://127.0.0.1:1/v1").close()
    with sqlite3.connect(tmp_path / "x.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_future'")

    # Before: alembic.util.exc.CommandError ("Can't locate revision ...").
    with pytest.raises(qna.StorageUnavailable, match="newer qna"):
        qna.connect(database_url=url, openai_base_url="http://127.0.0.1:1/v1")
