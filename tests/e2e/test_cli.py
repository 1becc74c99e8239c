"""The `qna` command as a user runs it, in-process through Click's runner.

Every test talks to a real database (SQLite and PostgreSQL, via `database_url`) and to a
real OpenAI-compatible HTTP server (`FakeOpenAI`); only the process boundary is skipped.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import delete, text
from sqlalchemy.engine import make_url

from qna.adapters.sqlalchemy.database import create_engine
from qna.adapters.sqlalchemy.migrate import head_revision
from qna.adapters.sqlalchemy.tables import qn_a
from qna.config import DEFAULT_MODEL
from qna.entrypoints import cli as cli_module
from qna.entrypoints.cli import cli
from tests.e2e.helpers import error_line, stored_rows
from tests.support.databases import (
    BROKEN_SQLITE_FILES,
    MISSING_DATABASE,
    WRONG_PASSWORD,
    broken_sqlite_file,
    with_missing_database,
    with_wrong_password,
)
from tests.support.fake_openai import (
    DEFAULT_ANSWER,
    Delay,
    Drop,
    FakeOpenAI,
    Raw,
    Reply,
    Status,
    Step,
    chat_completion,
)

QUESTION = "What is the capital of France?"
# Each command that opens the database, with arguments that get it that far.
EVERY_COMMAND_THAT_OPENS_THE_DATABASE = pytest.mark.parametrize(
    "args",
    [("ask", QUESTION), ("history",), ("show", str(uuid4())), ("db", "upgrade")],
    ids=["ask", "history", "show", "db-upgrade"],
)
HEAD = head_revision()


def qna(*args: str, input: str | bytes | None = None) -> Result:
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


def qna_json(*args: str) -> Any:
    result = qna(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def fake(fake_openai: FakeOpenAI, database_url: str, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    """qna configured for the fake LLM and the test database, as a user would by env."""
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", database_url)
    return fake_openai


@pytest.fixture
def one_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QNA_LLM_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("QNA_LLM_TIMEOUT_S", "0.3")


# -- asking ------------------------------------------------------------------------------------


def test_ask_prints_the_answer(fake: FakeOpenAI, database_url: str) -> None:
    result = qna("ask", QUESTION)

    assert result.exit_code == 0, result.stderr
    assert result.stdout == DEFAULT_ANSWER + "\n"
    assert result.stderr == ""
    assert fake.calls == 1
    assert fake.requests[0]["messages"] == [{"role": "user", "content": QUESTION}]
    assert [row["question"] for row in stored_rows(database_url)] == [QUESTION]


# In any case, as QNA_LOG_LEVEL: "HTTP" names the client, it is no typo to refuse.
@pytest.mark.parametrize("client", ["http", "HTTP", " Http "])
def test_ask_works_through_the_lean_http_client(
    fake: FakeOpenAI, database_url: str, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    monkeypatch.setenv("QNA_LLM_CLIENT", client)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")

    result = qna("ask", QUESTION)

    assert result.exit_code == 0, result.stderr
    assert result.stdout == DEFAULT_ANSWER + "\n"
    assert fake.authorizations == ["Bearer sk-test-key"]
    assert [row["status"] for row in stored_rows(database_url)] == ["answered"]


def test_ask_works_with_an_api_key_as_well(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")

    result = qna("ask", QUESTION)

    assert result.exit_code == 0, result.stderr
    assert result.stdout == DEFAULT_ANSWER + "\n"


def test_ask_json_prints_the_stored_record(fake: FakeOpenAI, database_url: str) -> None:
    fake.latency = 0.05

    record = qna_json("ask", QUESTION)

    assert record["status"] == "answered"
    assert record["question"] == QUESTION
    assert record["answer"] == DEFAULT_ANSWER
    assert record["model"] == DEFAULT_MODEL
    assert record["error"] is None
    # The fake counts words: this checks the usage is carried through, not invented.
    assert record["prompt_tokens"] == len(QUESTION.split())
    assert record["completion_tokens"] == len(DEFAULT_ANSWER.split())
    assert record["latency_ms"] >= 50
    assert record["created_at"].endswith("Z") and record["answered_at"].endswith("Z")
    [row] = stored_rows(database_url)
    assert row["id"] == UUID(record["id"])
    assert (
        row["status"],
        row["model"],
        row["prompt_tokens"],
        row["completion_tokens"],
        row["latency_ms"],
    ) == (
        "answered",
        record["model"],
        record["prompt_tokens"],
        record["completion_tokens"],
        record["latency_ms"],
    )


def test_ask_asks_for_the_configured_model(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QNA_MODEL", "my-local-model")

    record = qna_json("ask", QUESTION)

    assert fake.requests[0]["model"] == "my-local-model"
    assert record["model"] == record["response_model"] == "my-local-model"


def test_settings_are_read_from_dot_env_in_the_working_directory(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("QNA_MODEL=model-from-dotenv\n", encoding="utf-8")

    record = qna_json("ask", QUESTION)

    assert record["model"] == "model-from-dotenv"
    assert fake.requests[0]["model"] == "model-from-dotenv"


def test_a_dot_env_that_is_not_utf8_exits_3(fake: FakeOpenAI, tmp_path: Path) -> None:
    # Saved as Latin-1 by an editor: it was an internal error, a UnicodeDecodeError.
    (tmp_path / ".env").write_bytes(b"QNA_MODEL=caf\xe9\n")

    result = qna("ask", QUESTION)

    assert result.exit_code == 3, result.stderr
    assert ".env" in error_line(result.stderr)
    assert fake.calls == 0


def test_a_dot_env_that_cannot_be_read_exits_3(fake: FakeOpenAI, tmp_path: Path) -> None:
    # Unreadable (its permissions, a disk error): it was an internal error, exit 1.
    # A read that fails even for root, as the tests may run: /proc/self/mem at offset 0.
    (tmp_path / ".env").symlink_to("/proc/self/mem")

    result = qna("ask", QUESTION)

    assert result.exit_code == 3, result.stderr
    line = error_line(result.stderr)
    assert "internal error" not in line
    assert ".env" in line
    assert fake.calls == 0


@pytest.mark.parametrize(
    ("content", "line"),
    [
        # The quote left open swallows the lines after it: DATABASE_URL went unset, and
        # the records to the default database, with only python-dotenv's own warning.
        ('DATABASE_URL="postgresql://db/qna\nQNA_MODEL=after\n', 1),
        ("QNA_MODEL=fine\nthis is not a setting\n", 2),
        ("# a comment\n=no-name\n", 2),
    ],
    ids=["open-quote", "words", "no-name"],
)
def test_a_dot_env_line_that_is_no_setting_exits_3_naming_it(
    fake: FakeOpenAI, tmp_path: Path, content: str, line: int
) -> None:
    (tmp_path / ".env").write_text(content, encoding="utf-8")

    result = qna("ask", QUESTION)

    assert result.exit_code == 3, result.stderr
    assert error_line(result.stderr) == (
        f"qna: error: The .env file cannot be read: line {line} is not NAME=value "
        "(is a quote left open?)."
    )
    assert "python-dotenv" not in result.stderr
    assert fake.calls == 0


def test_a_directory_named_dot_env_is_no_settings_file(fake: FakeOpenAI, tmp_path: Path) -> None:
    # `python -m venv .env` makes one: a virtualenv, passed over, not refused.
    (tmp_path / ".env").mkdir()
    (tmp_path / ".env" / "QNA_MODEL").write_text("not-a-setting", encoding="utf-8")

    record = qna_json("ask", QUESTION)

    assert record["status"] == "answered"
    assert record["model"] != "not-a-setting"
    assert fake.calls == 1


def test_ask_dash_reads_the_question_from_stdin(fake: FakeOpenAI, database_url: str) -> None:
    result = qna("ask", "-", input="What is\nthe capital of France?\n")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == DEFAULT_ANSWER + "\n"
    # The trailing newline of a piped question is not part of it.
    assert fake.requests[0]["messages"][0]["content"] == "What is\nthe capital of France?"
    assert [row["question"] for row in stored_rows(database_url)] == [
        "What is\nthe capital of France?"
    ]


def test_ask_dash_reads_utf8_from_stdin(fake: FakeOpenAI, database_url: str) -> None:
    question = "Où est la tour Eiffel ? 🗼"

    result = qna("ask", "-", input=question.encode())

    assert result.exit_code == 0, result.stderr
    assert [row["question"] for row in stored_rows(database_url)] == [question]


def test_a_question_on_stdin_that_is_not_utf8_exits_4(fake: FakeOpenAI, database_url: str) -> None:
    # Latin-1 "café": where stdin decodes strictly (a UTF-8 locale) this was an
    # internal error, exit 1; elsewhere a "lone surrogate" nobody had typed.
    result = qna("ask", "-", input=b"caf\xe9 ?")

    assert result.exit_code == 4, result.stderr
    assert "not valid UTF-8" in error_line(result.stderr)
    assert stored_rows(database_url) == []
    assert fake.calls == 0


def test_retries_a_transient_failure_and_answers(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QNA_LLM_MAX_ATTEMPTS", "2")
    fake.script(Status(503, headers={"Retry-After": "0"}))

    record = qna_json("ask", QUESTION)

    assert record["status"] == "answered"
    assert fake.calls == 2


def test_the_cache_answers_a_repeated_question_unless_fresh(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QNA_CACHE_TTL", "3600")
    first = qna_json("ask", QUESTION)

    cached = qna_json("ask", "  what is the CAPITAL of   France? ")
    assert fake.calls == 1
    assert cached["source_id"] == first["id"]
    assert cached["answer"] == first["answer"]

    fresh = qna_json("ask", "--fresh", QUESTION)
    assert fake.calls == 2
    assert fresh["source_id"] is None


@pytest.mark.parametrize(
    ("reason", "note"),
    [
        ("length", "the answer is cut off: the model reached its token limit"),
        ("content_filter", "the answer is cut off by the provider's content filter"),
    ],
)
def test_an_answer_cut_off_is_printed_with_a_note_and_marked_in_the_history(
    fake: FakeOpenAI, database_url: str, reason: str, note: str
) -> None:
    fake.script(Reply(text="The first three primes are 2, 3 and", finish_reason=reason))

    result = qna("ask", "Name the first three primes.")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "The first three primes are 2, 3 and\n"  # the answer alone
    assert result.stderr == f"qna: note: {note} (finish_reason {reason}).\n"
    [row] = stored_rows(database_url)
    assert (row["status"], row["finish_reason"]) == ("answered", reason)
    history = qna("history").stdout
    assert f"[cut off: {reason}] The first three primes are 2, 3 and" in history
    shown = qna("show", str(row["id"])).stdout
    assert f"finish:   {reason}\n" in shown
    assert f"answer:   [cut off: {reason}] The first" in shown
    assert qna("show", "--json", str(row["id"])).stdout.count(f'"finish_reason": "{reason}"') == 1


def test_a_whole_answer_gets_no_note_and_no_mark(fake: FakeOpenAI) -> None:
    asked = qna("ask", QUESTION)
    record = qna_json("history")["items"][0]

    assert asked.stderr == ""
    assert record["finish_reason"] == "stop"
    assert "cut off" not in qna("history").stdout
    assert "finish:   stop\n" in qna("show", record["id"]).stdout


def test_the_cache_never_serves_an_answer_cut_off(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QNA_CACHE_TTL", "3600")
    fake.script(Reply(text="Paris is the", finish_reason="length"))
    cut_off = qna_json("ask", QUESTION)

    whole = qna_json("ask", QUESTION)  # asked again, not served the cut-off one
    cached = qna_json("ask", QUESTION)

    assert fake.calls == 2
    assert (cut_off["answer"], cut_off["finish_reason"]) == ("Paris is the", "length")
    assert (whole["source_id"], whole["finish_reason"]) == (None, "stop")
    assert (cached["source_id"], cached["finish_reason"]) == (whole["id"], "stop")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ("ask", "What", "is", "2+2?"),
            "Got unexpected extra arguments (is 2+2?); put the whole question in quotes.",
        ),
        (
            ("ask", "-5 squared?"),
            "No such option '-5'; to ask a question that starts with \"-\", put -- before it.",
        ),
    ],
    ids=["not-quoted", "starts-with-a-dash"],
)
def test_a_question_given_as_the_shell_splits_it_says_how_to_give_it(
    fake: FakeOpenAI, args: tuple[str, ...], said: str
) -> None:
    result = qna(*args)

    assert result.exit_code == 2
    assert result.stderr == f"qna: error: {said} See 'qna ask --help'.\n"
    assert fake.calls == 0


@pytest.mark.parametrize(
    "args", [("ask", "What is 2+2?", "-v"), ("ask", "-json", "hi")], ids=["after", "mistyped"]
)
def test_an_unknown_option_beside_a_question_gets_no_question_hint(
    fake: FakeOpenAI, args: tuple[str, ...]
) -> None:
    result = qna(*args)

    assert result.exit_code == 2
    assert "--" not in result.stderr.split("See")[0]  # no "put -- before it"
    assert "quotes" not in result.stderr


def test_a_variable_that_looks_meant_for_a_setting_is_warned_about(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A typo in QNA_API_TOKENS left the API open, without a word.
    monkeypatch.setenv("QNA_API_TOKEN", "secret")
    monkeypatch.setenv("QNA_SOMETHING_ELSE", "x")  # no setting's near miss: not qna's
    # Other programs' names: the SDK's own, a compose file's; and the SDK's old name
    # for the base URL, set beside the new one (fake's) for a tool that reads it.
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "x")
    monkeypatch.setenv("DATABASE_USER", "app")
    monkeypatch.setenv("OPENAI_API_BASE", "http://old.example/v1")
    (tmp_path / ".env").write_text("QNA_MODLE=gpt-x\n")
    monkeypatch.chdir(tmp_path)

    result = qna("history")

    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        "qna: warning: QNA_API_TOKEN is not a setting qna reads; did you mean QNA_API_TOKENS?",
        "qna: warning: QNA_MODLE is not a setting qna reads; did you mean QNA_MODEL?",
        "No questions yet.",
    ]


def test_the_sdks_old_name_for_the_base_url_alone_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qna.config import misread_variables

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_BASE", "http://localhost:11434/v1")

    assert misread_variables(tmp_path / "no.env") == [
        "OPENAI_API_BASE is not a setting qna reads; did you mean OPENAI_BASE_URL?"
    ]


# -- what reaches the terminal -----------------------------------------------------------------

# What an LLM (or a server posing as one) may send: a window title, colours, a C1 CSI
# that clears the screen, a lone carriage return that hides what came before it, DEL.
HOSTILE = "Paris\x1b]0;owned\x07 is \x1b[31mred\x1b[0m.\nA\ttab\x9b2J\rhidden\x7f"
HOSTILE_SHOWN = "Paris\\x1b]0;owned\\x07 is \\x1b[31mred\\x1b[0m.\nA\ttab\\x9b2J\\x0dhidden\\x7f"


def test_ask_shows_the_control_characters_of_an_answer_escaped(
    fake: FakeOpenAI, database_url: str
) -> None:
    fake.script(Reply(text=HOSTILE))

    result = qna("ask", QUESTION)

    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == (HOSTILE_SHOWN + "\n").encode()
    # --json stays exact: JSON escapes what it must itself, and a program reads it.
    [item] = qna_json("history")["items"]
    assert item["answer"] == HOSTILE


def test_json_output_escapes_what_a_terminal_would_obey_and_stays_exact(
    fake: FakeOpenAI, database_url: str
) -> None:
    # JSON may leave DEL, the C1 controls and bidi overrides raw: `qna ask --json` on a
    # terminal let U+009B (CSI to a terminal) clear the screen.
    answer = HOSTILE + " \u202eevil\u202c"
    fake.script(Reply(text=answer))

    asked = qna("ask", "--json", QUESTION)
    record_id = json.loads(asked.stdout)["id"]
    history = qna("history", "--json")
    shown = qna("show", "--json", record_id)

    for result in (asked, history, shown):
        assert result.exit_code == 0, result.stderr
        assert not any(char in result.stdout for char in "\x1b\x7f\x9b\u202e\u202c")
    assert json.loads(asked.stdout)["answer"] == answer
    assert json.loads(history.stdout)["items"][0]["answer"] == answer
    assert json.loads(shown.stdout)["answer"] == answer


def test_a_crlf_line_end_in_an_answer_is_kept(fake: FakeOpenAI) -> None:
    # Harmless on a terminal; escaped, every line of such an answer ended in \x0d.
    fake.script(Reply(text="One.\r\nTwo."))

    result = qna("ask", QUESTION)

    assert result.stdout_bytes == b"One.\r\nTwo.\n"


def test_history_and_show_escape_the_control_characters_of_a_record(
    fake: FakeOpenAI, database_url: str
) -> None:
    fake.script(Reply(text=HOSTILE))
    asked = qna_json("ask", QUESTION)
    # A question qna would refuse today, stored all the same (by hand, by an older qna).
    question = "Title\x1b]0;owned\x07?"
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(qn_a.update().values(question=question))
    finally:
        engine.dispose()

    show = qna("show", asked["id"])
    history = qna("history")

    assert "question: Title\\x1b]0;owned\\x07?\n" in show.stdout
    indented = HOSTILE_SHOWN.replace("\n", "\n" + " " * 10)  # under its label
    assert f"answer:   {indented}\n" in show.stdout
    assert "Title\\x1b]0;owned\\x07?" in history.stdout
    assert "Paris\\x1b]0;owned\\x07 is \\x1b[31mred" in history.stdout
    for output in (show.stdout, history.stdout):
        assert not any(char in output for char in "\x1b\x07\x9b\r\x7f")
    assert qna_json("show", asked["id"])["question"] == question


@pytest.mark.usefixtures("one_attempt")
def test_an_error_message_from_the_llm_is_shown_escaped(fake: FakeOpenAI) -> None:
    fake.script(Status(500, body={"error": {"message": "Overloaded\x1b[2J\x1b]52;c;cm0K\x07"}}))

    result = qna("ask", QUESTION)

    assert result.exit_code == 7
    line = error_line(result.stderr)
    assert "Overloaded\\x1b[2J\\x1b]52;c;cm0K\\x07" in line
    assert "\x1b" not in line


# The bidirectional embedding, override and isolate controls (U+202A-U+202E,
# U+2066-U+2069) reorder what a terminal shows after them: "Trojan Source". Hebrew and
# Arabic letters, and the plain marks LRM, RLM and ALM, reorder nothing and are text.
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
HEBREW = "\u05e9\u05dc\u05d5\u05dd"  # shalom
ARABIC = "\u0645\u0631\u062d\u0628\u0627"  # marhaban
MARKS = "\u200e\u200f\u061c"  # LRM, RLM, ALM
BIDI = (
    f"Pay \u202e0001$\u202c now; \u2067{HEBREW}\u2069 \u202b{ARABIC}\u202c {MARKS} " + BIDI_CONTROLS
)
BIDI_SHOWN = (
    f"Pay \\u202e0001$\\u202c now; \\u2067{HEBREW}\\u2069 \\u202b{ARABIC}\\u202c {MARKS} "
    "\\u202a\\u202b\\u202c\\u202d\\u202e\\u2066\\u2067\\u2068\\u2069"
)


def test_ask_shows_the_bidi_controls_of_an_answer_escaped(fake: FakeOpenAI) -> None:
    fake.script(Reply(text=BIDI))

    result = qna("ask", QUESTION)

    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == (BIDI_SHOWN + "\n").encode()
    [item] = qna_json("history")["items"]
    assert item["answer"] == BIDI


def test_history_and_show_escape_the_bidi_controls_of_a_question(fake: FakeOpenAI) -> None:
    # A question may hold them (they are not control characters to refuse), so an
    # asker can plant them in the history that someone else reads.
    question = f"Is {BIDI}?"
    asked = qna_json("ask", question)

    show = qna("show", asked["id"])
    history = qna("history")

    assert f"question: Is {BIDI_SHOWN}?\n" in show.stdout
    assert f"Is Pay \\u202e0001$\\u202c now; \\u2067{HEBREW}\\u2069" in history.stdout
    for output in (show.stdout, history.stdout):
        assert not any(char in output for char in BIDI_CONTROLS)
    assert qna_json("show", asked["id"])["question"] == question


@pytest.mark.usefixtures("one_attempt")
def test_an_error_message_from_the_llm_shows_its_bidi_controls_escaped(fake: FakeOpenAI) -> None:
    fake.script(Status(500, body={"error": {"message": f"Overloaded {BIDI}"}}))

    result = qna("ask", QUESTION)

    assert result.exit_code == 7
    line = error_line(result.stderr)
    assert f"Overloaded {BIDI_SHOWN}" in line


# -- history and show ----------------------------------------------------------------------


def test_history_lists_what_was_asked(fake: FakeOpenAI) -> None:
    asked = qna_json("ask", QUESTION)

    page = qna_json("history")
    assert [item["id"] for item in page["items"]] == [asked["id"]]
    assert page["items"][0] == asked
    assert page["next"] is None

    text = qna("history")
    assert text.exit_code == 0
    assert asked["id"] in text.stdout
    assert QUESTION in text.stdout
    assert DEFAULT_ANSWER in text.stdout
    # The time says its zone: without it, it read as the local time.
    asked_at = datetime.fromisoformat(asked["created_at"]).astimezone(UTC)
    assert asked_at.strftime("%Y-%m-%d %H:%M:%S UTC") in text.stdout


def test_history_pages_with_limit_and_cursor(fake: FakeOpenAI) -> None:
    ids = [qna_json("ask", f"Question number {n}?")["id"] for n in range(3)]
    newest_first = ids[::-1]

    first = qna_json("history", "-n", "2")
    assert [item["id"] for item in first["items"]] == newest_first[:2]
    assert first["next"]

    second = qna_json("history", "-n", "2", "--cursor", first["next"])
    assert [item["id"] for item in second["items"]] == newest_first[2:]
    assert second["next"] is None

    text = qna("history", "-n", "2")
    # The hint keeps the page size: without -n it went on 20 at a time.
    assert f"(more: qna history -n 2 --cursor {first['next']})" in text.stdout


def test_history_of_an_empty_database_is_empty(fake: FakeOpenAI) -> None:
    assert qna_json("history") == {"items": [], "next": None}

    # A person is told why nothing came; a script still reads no lines.
    text = qna("history")
    assert text.exit_code == 0
    assert text.stdout == ""
    assert text.stderr.strip() == "No questions yet."
    assert fake.calls == 0


def test_history_past_the_last_record_says_so(fake: FakeOpenAI, database_url: str) -> None:
    older = qna_json("ask", "An older question?")["id"]
    qna_json("ask", QUESTION)
    cursor = qna_json("history", "-n", "1")["next"]
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:  # the page the cursor points to is gone
            connection.execute(delete(qn_a).where(qn_a.c.id == UUID(older)))
    finally:
        engine.dispose()

    text_page = qna("history", "-n", "1", "--cursor", cursor)

    assert text_page.exit_code == 0
    assert text_page.stdout == ""
    assert text_page.stderr.strip() == "No more questions."


@pytest.mark.parametrize("cursor", ["not-a-cursor", ""])
def test_history_refuses_a_cursor_it_did_not_give_out(fake: FakeOpenAI, cursor: str) -> None:
    # An empty one, say from `jq -r '.next // empty'` after the last page, was read as
    # no cursor: the first page again, and a script paging on looped for ever.
    result = qna("history", "--cursor", cursor)

    assert result.exit_code == 4
    assert "cursor" in error_line(result.stderr)


@pytest.mark.parametrize("limit", ["0", "101", "many"])
def test_history_limit_out_of_range_is_a_usage_error(fake: FakeOpenAI, limit: str) -> None:
    result = qna("history", "-n", limit)

    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert "-n" in line or "--limit" in line


def test_history_by_status_lists_only_that_state_and_keeps_it_in_the_hint(
    fake: FakeOpenAI,
) -> None:
    fake.script(Status(400), Status(400))
    failures = []
    for n in range(2):
        refused = qna("ask", f"Refused {n}?", "--json")
        assert refused.exit_code == 10, refused.stderr
        failures.append(json.loads(refused.stdout)["id"])
    answered = qna_json("ask", QUESTION)["id"]

    assert [item["id"] for item in qna_json("history", "--status", "failed")["items"]] == (
        failures[::-1]
    )
    assert [item["id"] for item in qna_json("history", "--status", "answered")["items"]] == [
        answered
    ]
    text = qna("history", "--status", "FAILED", "-n", "1")
    assert text.exit_code == 0
    assert failures[1] in text.stdout and failures[0] not in text.stdout
    cursor = qna_json("history", "--status", "failed", "-n", "1")["next"]
    # Following the hint reads on among the failures, not the whole history.
    assert f"(more: qna history -n 1 --status failed --cursor {cursor})" in text.stdout
    rest = qna_json("history", "--status", "failed", "-n", "1", "--cursor", cursor)
    assert [item["id"] for item in rest["items"]] == [failures[0]]
    assert rest["next"] is None


def test_history_by_a_status_with_no_records_says_so(fake: FakeOpenAI) -> None:
    qna_json("ask", QUESTION)

    text = qna("history", "--status", "pending")

    assert text.exit_code == 0
    assert text.stdout == ""
    assert text.stderr.strip() == "No pending questions."


def test_history_by_an_unknown_status_is_a_usage_error(fake: FakeOpenAI) -> None:
    result = qna("history", "--status", "done")

    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert "--status" in line and "'pending', 'answered', 'failed'" in line


def test_show_prints_one_record(fake: FakeOpenAI) -> None:
    asked = qna_json("ask", QUESTION)

    result = qna("show", asked["id"])

    assert result.exit_code == 0, result.stderr
    assert f"id:       {asked['id']}" in result.stdout
    assert "status:   answered" in result.stdout
    assert f"question: {QUESTION}" in result.stdout
    assert f"answer:   {DEFAULT_ANSWER}" in result.stdout
    assert f"tokens:   {asked['prompt_tokens']} prompt" in result.stdout
    assert qna_json("show", asked["id"]) == asked


def test_show_tells_only_the_token_counts_the_llm_reported(fake: FakeOpenAI) -> None:
    body = chat_completion(text="Paris.", model="m")
    body["usage"] = {"completion_tokens": 5}
    fake.script(Raw(200, json.dumps(body).encode()))
    asked = qna_json("ask", QUESTION)

    shown = qna("show", asked["id"]).stdout

    assert "tokens:   5 completion\n" in shown
    assert "None" not in shown


def test_show_keeps_a_multi_line_answer_under_its_label(fake: FakeOpenAI) -> None:
    fake.script(Reply(text="First line.\nSecond line.\n\n  Indented."))
    asked = qna_json("ask", "Line one\nline two?")

    shown = qna("show", asked["id"]).stdout

    assert "question: Line one\n          line two?\n" in shown
    assert (
        "answer:   First line.\n          Second line.\n          \n            Indented.\n"
    ) in shown


def test_history_marks_an_answer_from_the_cache(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QNA_CACHE_TTL", "3600")
    qna("ask", QUESTION)
    qna("ask", QUESTION)

    lines = qna("history").stdout.splitlines()

    assert lines[1] == f"    [cached] {DEFAULT_ANSWER}"  # the newer, from the cache
    assert lines[3] == f"    {DEFAULT_ANSWER}"


def test_show_names_the_record_a_cached_answer_came_from(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QNA_CACHE_TTL", "3600")
    first = qna_json("ask", QUESTION)
    cached = qna_json("ask", QUESTION)

    assert (
        f"source:   the cache (the answer of {first['id']})\n" in qna("show", cached["id"]).stdout
    )
    assert "source:" not in qna("show", first["id"]).stdout


def test_show_an_unknown_id_exits_5(fake: FakeOpenAI) -> None:
    unknown = str(uuid4())

    result = qna("show", unknown)

    assert result.exit_code == 5
    assert unknown in error_line(result.stderr)
    assert result.stdout == ""


def test_show_something_that_is_not_an_id_exits_5(fake: FakeOpenAI) -> None:
    result = qna("show", "garbage")

    assert result.exit_code == 5
    assert "garbage" in error_line(result.stderr)


def test_show_takes_a_start_of_an_id_that_only_one_record_has(fake: FakeOpenAI) -> None:
    asked = qna_json("ask", QUESTION)

    by_start = qna("show", asked["id"][:8].upper())

    assert by_start.exit_code == 0, by_start.stderr
    assert f"id:       {asked['id']}" in by_start.stdout
    assert qna_json("show", asked["id"][:13]) == asked


def test_show_refuses_a_start_that_two_ids_have_naming_both(
    fake: FakeOpenAI, database_url: str
) -> None:
    first = qna_json("ask", QUESTION)
    second = qna_json("ask", "And of Italy?")
    twin = UUID(first["id"][:30] + ("000000" if first["id"][30:] != "000000" else "ffffff"))
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(qn_a.update().where(qn_a.c.id == UUID(second["id"])).values(id=twin))
    finally:
        engine.dispose()

    result = qna("show", first["id"][:8])

    assert result.exit_code == 4
    line = error_line(result.stderr)
    assert first["id"] in line and str(twin) in line and "give more of it" in line
    assert result.stdout == ""
    assert qna_json("show", str(twin))["question"] == "And of Italy?"


def test_show_refuses_a_start_of_fewer_than_four_characters(fake: FakeOpenAI) -> None:
    asked = qna_json("ask", QUESTION)

    result = qna("show", asked["id"][:3])

    assert result.exit_code == 4
    assert "at least 4 characters" in error_line(result.stderr)


# -- questions refused before anything happens ------------------------------------------------


@pytest.mark.parametrize(
    ("question", "max_length"),
    [
        pytest.param("", None, id="empty"),
        pytest.param("   ", None, id="blank"),
        pytest.param("\u200b\ufeff", None, id="invisible"),
        pytest.param("x" * 11, "10", id="over-a-set-limit"),
        pytest.param("x" * 4001, None, id="over-the-default-limit"),
        pytest.param("a\x00b", None, id="nul"),
        pytest.param("a\x1bb", None, id="escape"),
    ],
)
def test_an_invalid_question_exits_4_and_stores_nothing(
    fake: FakeOpenAI,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    question: str,
    max_length: str | None,
) -> None:
    if max_length is not None:
        monkeypatch.setenv("QNA_MAX_QUESTION_LENGTH", max_length)

    result = qna("ask", question)

    assert result.exit_code == 4
    error_line(result.stderr)
    assert result.stdout == ""
    assert stored_rows(database_url) == []
    assert fake.calls == 0


def test_an_invalid_question_on_stdin_exits_4(fake: FakeOpenAI, database_url: str) -> None:
    result = qna("ask", "-", input="\n\n")

    assert result.exit_code == 4
    assert "empty" in error_line(result.stderr)
    assert stored_rows(database_url) == []


@pytest.mark.parametrize(
    ("question", "max_length"),
    [
        pytest.param("x" * 10, "10", id="at-a-set-limit"),
        pytest.param("x" * 4000, None, id="at-default"),
    ],
)
def test_a_question_at_the_limit_is_asked(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, question: str, max_length: str | None
) -> None:
    if max_length is not None:
        monkeypatch.setenv("QNA_MAX_QUESTION_LENGTH", max_length)

    result = qna("ask", question)

    assert result.exit_code == 0, result.stderr
    assert fake.calls == 1


# -- the LLM failing --------------------------------------------------------------------------

NO_CHOICES = json.dumps({**chat_completion(text="x", model="m"), "choices": []}).encode()


@pytest.mark.parametrize(
    ("step", "exit_code", "error_kind"),
    [
        pytest.param(Status(500), 7, "llm_unavailable", id="500"),
        pytest.param(Status(503), 7, "llm_unavailable", id="503"),
        pytest.param(Drop(), 7, "llm_unavailable", id="dropped-connection"),
        pytest.param(Status(429), 8, "llm_rate_limited", id="429"),
        pytest.param(Delay(3), 9, "llm_timeout", id="timeout"),
        pytest.param(Status(401), 10, "llm_refused", id="401"),
        pytest.param(Status(404), 10, "llm_refused", id="404-unknown-model"),
        pytest.param(Raw(body=b"not json"), 11, "llm_bad_response", id="malformed-body"),
        pytest.param(Raw(body=NO_CHOICES), 11, "llm_bad_response", id="no-choices"),
    ],
)
@pytest.mark.usefixtures("one_attempt")
def test_an_llm_failure_exits_with_its_code_and_is_recorded(
    fake: FakeOpenAI, database_url: str, step: Step, exit_code: int, error_kind: str
) -> None:
    fake.script(step)

    result = qna("ask", QUESTION)

    assert result.exit_code == exit_code
    line = error_line(result.stderr)
    assert result.stdout == ""
    assert fake.calls == 1
    [item] = qna_json("history")["items"]
    assert item["status"] == "failed"
    assert item["answer"] is None
    assert item["question"] == QUESTION
    assert item["error"]["code"] == error_kind
    assert item["error"]["message"]
    assert f"(recorded as {item['id']})" in line
    [row] = stored_rows(database_url)
    assert (row["status"], row["error_kind"]) == ("failed", error_kind)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_an_answer_the_database_refuses_is_printed_all_the_same_and_exits_6(
    fake_openai: FakeOpenAI,
    outcomes_refused: str,
    monkeypatch: pytest.MonkeyPatch,
    as_json: bool,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", outcomes_refused)

    result = qna("ask", QUESTION, *(["--json"] if as_json else []))

    # The LLM answered, and was paid: the answer reaches the asker, then the error.
    assert result.exit_code == 6
    [row] = stored_rows(outcomes_refused)
    assert row["status"] == "pending"  # until it is closed as abandoned
    line = error_line(result.stderr)
    assert "No space left on device" in line
    assert f"not stored: record {row['id']} stays pending" in line
    if as_json:
        record = json.loads(result.stdout)
        assert (record["id"], record["status"]) == (str(row["id"]), "answered")
        assert record["answer"] == DEFAULT_ANSWER
    else:
        assert result.stdout == DEFAULT_ANSWER + "\n"
    assert fake_openai.calls == 1


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize(
    ("step", "exit_code", "error_kind", "llm_says"),
    [
        pytest.param(Status(429), 8, "llm_rate_limited", "rate", id="429"),
        pytest.param(Status(401), 10, "llm_refused", "401", id="401"),
    ],
)
@pytest.mark.usefixtures("one_attempt")
def test_an_llm_failure_the_database_refuses_too_tells_both_with_the_llms_code(
    fake_openai: FakeOpenAI,
    outcomes_refused: str,
    monkeypatch: pytest.MonkeyPatch,
    step: Step,
    exit_code: int,
    error_kind: str,
    llm_says: str,
    as_json: bool,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", outcomes_refused)
    fake_openai.script(step)

    result = qna("ask", QUESTION, *(["--json"] if as_json else []))

    # The LLM's failure is why there is no answer: its code, as if it had been stored.
    assert result.exit_code == exit_code, result.stderr
    [row] = stored_rows(outcomes_refused)
    assert row["status"] == "pending"
    line = error_line(result.stderr)
    assert llm_says in line.lower()  # the LLM's error, not lost behind the database's
    assert "No space left on device" in line
    assert f"record {row['id']} stays pending" in line
    if as_json:
        record = json.loads(result.stdout)
        assert (record["id"], record["status"]) == (str(row["id"]), "failed")
        assert record["error"]["code"] == error_kind
    else:
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("step", "exit_code", "error_kind"),
    [
        pytest.param(Status(429), 8, "llm_rate_limited", id="429"),
        pytest.param(Raw(body=NO_CHOICES), 11, "llm_bad_response", id="no-choices"),
    ],
)
@pytest.mark.usefixtures("one_attempt")
def test_a_failed_ask_with_json_prints_the_stored_failed_record(
    fake: FakeOpenAI, database_url: str, step: Step, exit_code: int, error_kind: str
) -> None:
    fake.script(step)

    result = qna("ask", "--json", QUESTION)

    assert result.exit_code == exit_code
    record = json.loads(result.stdout)
    assert (record["status"], record["error"]["code"]) == ("failed", error_kind)
    assert record["answer"] is None
    assert record == qna_json("show", record["id"])  # as stored, in the same shape
    assert f"(recorded as {record['id']})" in error_line(result.stderr)
    [row] = stored_rows(database_url)
    assert row["id"] == UUID(record["id"])


@pytest.mark.usefixtures("one_attempt")
def test_a_failed_ask_shows_as_failed(fake: FakeOpenAI) -> None:
    fake.script(Status(429))
    qna("ask", QUESTION)
    [item] = qna_json("history")["items"]

    result = qna("show", item["id"])

    assert "status:   failed" in result.stdout
    assert "answer:   [failed: llm_rate_limited]" in result.stdout
    assert "[failed: llm_rate_limited]" in qna("history").stdout


def test_an_api_key_in_an_error_is_not_shown(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-test-0123456789SECRET"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("QNA_LLM_MAX_ATTEMPTS", "1")
    fake.script(Status(401, body={"error": {"message": f"Incorrect API key provided: {key}."}}))

    result = qna("ask", QUESTION)

    assert result.exit_code == 10
    assert key not in error_line(result.stderr)
    assert key not in qna("history", "--json").stdout


# -- configuration and the database -----------------------------------------------------------


def test_no_api_key_and_no_base_url_exits_3_naming_the_key(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)

    result = qna("ask", QUESTION)

    assert result.exit_code == 3
    assert "OPENAI_API_KEY" in error_line(result.stderr)
    assert stored_rows(database_url) == []


@pytest.mark.parametrize("question", ["", "   ", "bell\x07"], ids=["empty", "blank", "control"])
def test_an_invalid_question_exits_4_without_an_api_key_too(
    database_url: str, monkeypatch: pytest.MonkeyPatch, question: str
) -> None:
    # Before: exit 3 for the missing key, and the question was refused only once
    # the key was set. The question is the asker's to fix whatever the settings.
    monkeypatch.setenv("DATABASE_URL", database_url)

    result = qna("ask", question)

    assert result.exit_code == 4, result.stderr
    assert "The question" in error_line(result.stderr)
    assert stored_rows(database_url) == []


def test_an_invalid_question_on_stdin_exits_4_without_an_api_key_too(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)

    result = qna("ask", "-", input="\n\n")

    assert result.exit_code == 4, result.stderr
    assert "empty" in error_line(result.stderr)


@pytest.mark.parametrize("client", ["openai", "http"])
@pytest.mark.parametrize(
    "key",
    [
        "sk-…",  # an ellipsis copied from an example
        "sk-abc def",
        "sk-abc\x1bdef",
    ],
    ids=["non-ascii", "inner-space", "control"],
)
def test_an_api_key_that_cannot_be_sent_exits_3_and_stores_nothing(
    fake: FakeOpenAI,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    client: str,
    key: str,
) -> None:
    # It cannot go into an Authorization header: the request failed as an internal
    # error, or as "unreachable" after every retry, and left the question pending.
    monkeypatch.setenv("QNA_LLM_CLIENT", client)
    monkeypatch.setenv("OPENAI_API_KEY", key)

    result = qna("ask", QUESTION)

    assert result.exit_code == 3, result.stderr
    line = error_line(result.stderr)
    assert "OPENAI_API_KEY" in line
    assert key not in line
    assert stored_rows(database_url) == []
    assert fake.calls == 0


@pytest.mark.parametrize("client", ["openai", "http"])
def test_an_api_key_is_sent_without_surrounding_whitespace(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    # A .env saved with Windows line ends keeps a \r at the end of the value.
    monkeypatch.setenv("QNA_LLM_CLIENT", client)
    monkeypatch.setenv("OPENAI_API_KEY", " sk-test-key\r")

    result = qna("ask", QUESTION)

    assert result.exit_code == 0, result.stderr
    assert fake.authorizations == ["Bearer sk-test-key"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QNA_LLM_MAX_ATTEMPTS", "abc"),
        ("QNA_LLM_MAX_ATTEMPTS", "0"),
        ("QNA_LLM_TIMEOUT_S", "-1"),
        ("QNA_MAX_QUESTION_LENGTH", "0"),
        ("QNA_DB_POOL_SIZE", "lots"),
        ("QNA_DB_CONNECT_TIMEOUT_S", "inf"),
        ("QNA_DB_CONNECT_TIMEOUT_S", "1e10"),  # past libpq's int: every connect refused
        ("QNA_DB_STATEMENT_TIMEOUT_S", "-1"),
        ("QNA_DB_STATEMENT_TIMEOUT_S", "nan"),
        ("QNA_DB_STATEMENT_TIMEOUT_S", "3000000"),  # past PostgreSQL's limit
        ("QNA_CACHE_TTL", "inf"),
        ("QNA_CACHE_TTL", "1e12"),  # dates that far back do not exist
        ("QNA_IDEMPOTENCY_TTL_S", "1e11"),
        ("QNA_IDEMPOTENCY_WAIT_S", "inf"),
        ("QNA_LLM_DEADLINE_S", "1e15"),
        ("QNA_LOG_LEVEL", "LOUD"),
        ("QNA_MODEL", "m" * 201),  # longer than the stored column
        ("QNA_MODEL", "   "),  # asked for, and stored with every record
        ("QNA_MODEL", "gpt-5-mini\nx"),
        ("QNA_RATE_LIMIT", "abc"),
        ("QNA_RATE_LIMIT", "0/minute"),  # refused every request, for ever
        ("QNA_RATE_LIMIT", "100/day; 0 per second"),
        ("QNA_API_TOKENS", ","),  # no token in it: the API was open to everyone
        ("QNA_API_TOKENS", " , , "),
        ("QNA_LLM_CLIENT", "curl"),
        ("QNA_RATE_LIMIT_STORAGE", "foo://"),
        ("QNA_RATE_LIMIT_STORAGE", "async+memory://"),  # flask-limiter is synchronous
    ],
)
def test_an_invalid_setting_exits_3_naming_it(
    fake: FakeOpenAI, name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)

    result = qna("ask", QUESTION)

    assert result.exit_code == 3
    line = error_line(result.stderr)
    assert name in line
    # pydantic's own wording for the kind of error is no help to the person reading.
    assert "Value error" not in line
    assert fake.calls == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # unbalanced bracket
        "http://[example.com]/v1",
        "http://",
        "http://:8000/v1",
        "localhost:11434/v1",  # no scheme
        "ftp://example.com/v1",
        "http://localhost:99999/v1",
        "http://localhost:port/v1",
        "http://local host/v1",
    ],
)
def test_a_base_url_that_is_not_an_http_url_with_a_host_exits_3(
    fake: FakeOpenAI, database_url: str, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", url)

    result = qna("ask", QUESTION)

    assert result.exit_code == 3
    assert "OPENAI_BASE_URL" in error_line(result.stderr)
    assert stored_rows(database_url) == []
    assert fake.calls == 0


def test_a_rate_limit_storage_whose_package_is_missing_exits_3_naming_it(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if it were not installed
    monkeypatch.setenv("QNA_RATE_LIMIT_STORAGE", "redis://127.0.0.1:6379")

    result = qna("ask", QUESTION)

    assert result.exit_code == 3
    line = error_line(result.stderr)
    assert "QNA_RATE_LIMIT_STORAGE" in line
    assert "pip install redis" in line
    assert fake.calls == 0


@pytest.mark.parametrize("url", ["not a url", "mysql://u:p@127.0.0.1/qna"])
def test_a_database_url_that_is_not_one_exits_3(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", url)

    result = qna("ask", QUESTION)

    assert result.exit_code == 3
    assert "DATABASE_URL" in error_line(result.stderr)


def test_a_postgresql_url_with_an_unknown_option_exits_3_naming_it(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq refuses it only when connecting, and that was an internal error, exit 1.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@127.0.0.1:1/x?sslmod=require")

    result = qna("history")

    assert result.exit_code == 3, result.stderr
    line = error_line(result.stderr)
    assert "DATABASE_URL" in line
    assert '"sslmod"' in line
    assert "secret" not in line


def test_a_database_url_is_read_without_surrounding_whitespace(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The records went to a file named "qna.db " (or "qna.db\r"), next to the one the
    # user would look in.
    url = f"sqlite:///{tmp_path / 'qna.db'}"
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", f" {url} \r")

    asked = qna("ask", QUESTION)

    assert asked.exit_code == 0, asked.stderr
    assert [row["question"] for row in stored_rows(url)] == [QUESTION]
    assert [path.name for path in tmp_path.iterdir() if path.name != path.name.strip()] == []


def test_a_sqlite_path_under_home_is_expanded(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory was made under the home directory, the file then opened under a
    # directory named "~" in the working one: "unable to open database file", exit 6.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///~/data/qna.db")

    asked = qna("ask", QUESTION)

    assert asked.exit_code == 0, asked.stderr
    [row] = stored_rows(f"sqlite:///{tmp_path / 'home' / 'data' / 'qna.db'}")
    assert row["question"] == QUESTION
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite:///"])
def test_an_in_memory_sqlite_database_exits_3(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    # It would answer, store the record in memory and lose it on exit, with 0.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", url)

    result = qna("ask", QUESTION)

    assert result.exit_code == 3, result.stderr
    assert "DATABASE_URL" in error_line(result.stderr)
    assert fake_openai.calls == 0


@EVERY_COMMAND_THAT_OPENS_THE_DATABASE
def test_an_unreachable_database_exits_6(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@127.0.0.1:1/x")
    monkeypatch.setenv("QNA_DB_CONNECT_TIMEOUT_S", "2")

    result = qna(*args)

    assert result.exit_code == 6
    line = error_line(result.stderr)
    assert "secret" not in line
    assert fake_openai.calls == 0


@pytest.mark.parametrize(
    ("args", "exit_code"),
    [
        (("show", "3f0"), 4),
        (("show", ""), 4),
        (("show", "not-an-id"), 5),
        (("history", "--cursor", "garbage"), 4),
    ],
    ids=["short-start", "empty-id", "not-an-id", "bad-cursor"],
)
def test_an_argument_wrong_on_its_face_is_refused_before_the_database_is_opened(
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
    exit_code: int,
) -> None:
    # It was exit 6 with the database down (fix the database, it said), and a new
    # SQLite file created and migrated to refuse it.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    for url in ("postgresql://u:secret@127.0.0.1:1/x", f"sqlite:///{tmp_path}/new.db"):
        monkeypatch.setenv("DATABASE_URL", url)

        result = qna(*args)

        assert result.exit_code == exit_code, result.stderr
        error_line(result.stderr)
    assert not (tmp_path / "new.db").exists()


@EVERY_COMMAND_THAT_OPENS_THE_DATABASE
def test_a_wrong_database_password_exits_3_naming_database_url(
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    postgres_url: str,
    args: tuple[str, ...],
) -> None:
    # It exited 6, "the database is unavailable": an invitation to retry what no
    # wait mends. The setting is wrong.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", with_wrong_password(postgres_url))

    result = qna(*args)

    assert result.exit_code == 3, result.stderr
    line = error_line(result.stderr)
    assert "DATABASE_URL" in line
    assert "password authentication failed" in line
    assert WRONG_PASSWORD not in line
    assert fake_openai.calls == 0


def test_a_database_the_server_does_not_have_exits_3_naming_it(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", with_missing_database(postgres_url))

    result = qna("ask", "What is the capital of France?")

    assert result.exit_code == 3, result.stderr
    line = error_line(result.stderr)
    assert "DATABASE_URL" in line and "database name" in line
    assert f'database "{MISSING_DATABASE}" does not exist' in line
    assert fake_openai.calls == 0


def test_a_read_only_postgresql_database_exits_6(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    # A hot standby, or a database set default_transaction_read_only: PostgreSQL's
    # refusal is an InternalError to psycopg2, and qna called it an internal error,
    # exit 1, on a line that held the whole statement and its parameters.
    read_only = make_url(postgres_url).update_query_dict(
        {"options": "-c default_transaction_read_only=on"}
    )
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", read_only.render_as_string(hide_password=False))

    result = qna("ask", QUESTION)

    assert result.exit_code == 6, result.stderr
    line = error_line(result.stderr)
    assert line == (
        "qna: error: The database is unavailable: cannot execute INSERT in a read-only transaction"
    )
    assert fake_openai.calls == 0


def test_a_read_only_database_still_shows_a_record_its_asker_abandoned(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    # Reading closes a long-pending record as abandoned, which is a write: on a
    # database that takes none (a standby), `qna show` and `qna history` failed with
    # exit 6 whenever such a record was among those read, and worked otherwise.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            connection.execute(delete(qn_a))
        asked = qna_json("ask", QUESTION)
        with engine.begin() as connection:  # as a process killed mid-ask left it, long ago
            connection.execute(
                qn_a.update().values(
                    status="pending",
                    answer=None,
                    answered_at=None,
                    created_at=datetime(2020, 1, 1, tzinfo=UTC),
                    abandon_at=datetime(2020, 1, 1, 0, 3, tzinfo=UTC),
                )
            )
    finally:
        engine.dispose()
    read_only = make_url(postgres_url).update_query_dict(
        {"options": "-c default_transaction_read_only=on"}
    )
    monkeypatch.setenv("DATABASE_URL", read_only.render_as_string(hide_password=False))

    show = qna("show", asked["id"])
    history = qna_json("history")

    assert show.exit_code == 0, show.stderr
    assert "status:   failed\n" in show.stdout
    assert "answer:   [failed: abandoned] " in show.stdout
    [item] = history["items"]
    assert (item["status"], item["error"]["code"]) == ("failed", "abandoned")
    # Reported so, not stored so: the database took no write.
    assert [row["status"] for row in stored_rows(postgres_url)] == ["pending"]


@pytest.mark.parametrize("kind", BROKEN_SQLITE_FILES)
@EVERY_COMMAND_THAT_OPENS_THE_DATABASE
def test_a_sqlite_file_that_is_not_a_database_exits_6(
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
    kind: str,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", broken_sqlite_file(tmp_path / "qna.db", kind))

    result = qna(*args)

    assert result.exit_code == 6
    assert "database" in error_line(result.stderr)
    assert fake_openai.calls == 0


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ("-c default_transaction_read_only=on", "read-only"),  # as a standby is
        ("-c search_path=nowhere", "no schema"),
    ],
    ids=["read-only", "no-schema"],
)
def test_a_postgresql_database_that_refuses_the_tables_exits_6(
    fake_openai: FakeOpenAI,
    empty_postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    options: str,
    reason: str,
) -> None:
    # Creating the tables failed as an internal error, exit 1, with the SQL and a link.
    url = make_url(empty_postgres_url).update_query_dict({"options": options})
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))

    result = qna("db", "upgrade")

    assert result.exit_code == 6, result.stderr
    line = error_line(result.stderr)
    assert reason in line
    assert "[SQL:" not in line


@pytest.mark.parametrize(
    "args",
    [("ask", QUESTION), ("history",), ("db", "upgrade")],
    ids=["ask", "history", "db-upgrade"],
)
def test_a_sqlite_directory_that_cannot_be_made_exits_6(
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
) -> None:
    # A file where the directory should be (as /sys refuses one, or a read-only
    # disk): it was an internal error, exit 1, naming FileExistsError.
    (tmp_path / "data").write_text("not a directory")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'data' / 'qna' / 'qna.db'}")

    result = qna(*args)

    assert result.exit_code == 6, result.stderr
    line = error_line(result.stderr)
    assert "internal error" not in line
    assert str(tmp_path / "data") in line
    assert fake_openai.calls == 0


@EVERY_COMMAND_THAT_OPENS_THE_DATABASE
def test_a_database_migrated_by_a_newer_qna_exits_6_saying_so(
    fake: FakeOpenAI, database_url: str, args: tuple[str, ...]
) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))

        result = qna(*args)

        assert result.exit_code == 6, result.stderr
        assert "newer qna" in error_line(result.stderr)
        assert fake.calls == 0
    finally:
        with engine.begin() as connection:  # the next test's database is migrated
            connection.execute(text(f"UPDATE alembic_version SET version_num = '{HEAD}'"))
        engine.dispose()


@EVERY_COMMAND_THAT_OPENS_THE_DATABASE
def test_another_applications_alembic_database_exits_6_without_blaming_a_newer_qna(
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
) -> None:
    # DATABASE_URL pointed at another app's SQLite file, which Alembic migrates too: it
    # was "migrated by a newer qna ... upgrade qna", which would change nothing.
    path = tmp_path / "other-app.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES ('3b4e5c2a1d0f')")
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    connection.close()
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")

    result = qna(*args)

    assert result.exit_code == 6, result.stderr
    line = error_line(result.stderr)
    assert "schema qna does not know" in line
    assert "3b4e5c2a1d0f" in line
    assert "another application" in line
    assert "was migrated by a newer qna" not in line
    assert fake_openai.calls == 0
    with sqlite3.connect(path) as connection:  # and it was left as it was
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert "qn_a" not in tables


def test_db_upgrade_says_up_to_date(fake: FakeOpenAI) -> None:
    result = qna("db", "upgrade")

    assert result.exit_code == 0, result.stderr
    assert "up to date" in result.stdout


def test_db_upgrade_creates_the_table_in_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'qna.db'}"
    monkeypatch.setenv("DATABASE_URL", url)

    result = qna("db", "upgrade")

    assert result.exit_code == 0, result.stderr
    assert "up to date" in result.stdout
    assert stored_rows(url) == []  # the table exists, and is empty


# -- help and version -------------------------------------------------------------------------


def test_version() -> None:
    result = qna("--version")

    assert result.exit_code == 0
    assert result.stdout.startswith("qna, version ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--help",), "ask"),
        (("-h",), "history"),
        (("ask", "--help"), "Exit codes"),
        (("history", "--help"), "--cursor"),
        (("history", "--help"), "4 a cursor this command did not give out"),
        (("show", "--help"), "ID"),
        (("show", "--help"), "5 no such record"),
        (("db", "upgrade", "--help"), "migration"),
        (("db", "upgrade", "--help"), "6 database unavailable"),
    ],
)
def test_help_needs_no_settings(args: tuple[str, ...], expected: str) -> None:
    result = qna(*args)

    assert result.exit_code == 0
    assert expected in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "names", "help_of"),
    [
        (("frobnicate",), "frobnicate", "qna"),
        (("--bogus",), "--bogus", "qna"),
        (("ask", "--bogus", QUESTION), "--bogus", "qna ask"),
        (("ask",), "QUESTION", "qna ask"),
        (("ask", QUESTION, "extra"), "extra", "qna ask"),
        (("show",), "ID", "qna show"),
        (("history", "--jsn"), "--json", "qna history"),  # with Click's suggestion
        (("db", "frob"), "frob", "qna db"),
        (("db", "upgrade", "--x"), "--x", "qna db upgrade"),
        (("serve", "--worker-class", "x"), "gthread", "qna serve"),
        # Errors Click raises without naming their command.
        (("history", "-n"), "'-n' requires an argument", "qna history"),
        (("history", "--cursor"), "'--cursor' requires an argument", "qna history"),
        (("ask", "--json=yes", QUESTION), "'--json' does not take a value", "qna ask"),
        (("serve", "--port"), "'--port' requires an argument", "qna serve"),
        (("--version=1",), "'--version' does not take a value", "qna"),
    ],
)
def test_a_usage_error_is_one_line_pointing_at_the_help(
    args: tuple[str, ...], names: str, help_of: str
) -> None:
    result = qna(*args)

    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert names in line
    assert line.endswith(f" See '{help_of} --help'.")
    assert result.stdout == ""


def test_qna_alone_shows_the_help() -> None:
    result = qna()

    assert result.exit_code == 2
    assert "Commands:" in result.stderr


class InterruptedImport(importlib.abc.MetaPathFinder):
    """Ctrl-C while Python imports the module `name`, each time it is imported."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == self.name:
            raise KeyboardInterrupt


@pytest.mark.usefixtures("fake")
def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A command loads the container's imports when it first needs them, a second or
    # more on a busy machine: Ctrl-C lands there easily. The module it interrupted is
    # half-made, and importing it again on the way out ended in a traceback.
    monkeypatch.delitem(sys.modules, "qna.container", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport("qna.container"), *sys.meta_path])

    result = qna("ask", QUESTION)

    assert result.exit_code == 130
    assert error_line(result.stderr) == "qna: error: interrupted"


def test_a_second_ctrl_c_while_qna_winds_up_is_one_line_and_exit_130(
    fake: FakeOpenAI, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pressed twice, as people do: the second landed while qna closed its database
    # pool and LLM client, broke that off, and ended in a traceback (or Click's
    # "Aborted!" and exit 1).
    from qna import container as qna_container

    def shutdown_interrupted(container: qna_container.Container) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real_shutdown(container)

    real_shutdown = qna_container.shutdown
    monkeypatch.setattr(qna_container, "shutdown", shutdown_interrupted)
    fake.latency = 30

    def first_ctrl_c_once_asked() -> None:
        deadline = time.monotonic() + 30
        while fake.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=first_ctrl_c_once_asked, daemon=True).start()
    result = qna("ask", QUESTION)

    assert result.exit_code == 130
    assert error_line(result.stderr) == "qna: error: interrupted"
    [row] = stored_rows(database_url)
    assert (row["status"], row["error_kind"]) == ("failed", "abandoned")


def test_serve_without_an_llm_setting_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)

    result = CliRunner().invoke(cli, ["serve", "--port", "0"])

    assert result.exit_code == 3
    assert "OPENAI_API_KEY" in result.output
    assert "Traceback" not in result.output
    # Refusing to start changed nothing in the caller's process.
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


@pytest.mark.parametrize(
    ("interrupt", "exit_code", "said"),
    [(KeyboardInterrupt, 130, "interrupted"), (cli_module.Terminated, 143, "terminated")],
)
def test_an_interrupt_that_click_meets_itself_is_told_as_any_other(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    interrupt: type[KeyboardInterrupt],
    exit_code: int,
    said: str,
) -> None:
    # Outside a command's own handling (as it ends, or while click reads the
    # arguments) click turns the interrupt into its Abort: it said "Aborted!", exit 1.
    def met_by_click(*_args: object, **_kwargs: object) -> None:
        raise click.Abort() from interrupt()

    monkeypatch.setattr(cli, "main", met_by_click)

    assert cli_module._run_cli() == exit_code
    assert capsys.readouterr().err == f"qna: error: {said}\n"
