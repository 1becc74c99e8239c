"""The installed `qna` console script, run as a real process with pipes for its streams."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import Connection, text

from qna.adapters.sqlalchemy import migrate
from qna.adapters.sqlalchemy.database import create_engine
from tests.e2e.helpers import error_line, settings_free_environ, stored_rows
from tests.support.fake_openai import DEFAULT_ANSWER, Delay, FakeOpenAI, Status

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
# platformdirs follows XDG only on Linux; elsewhere the default file lives elsewhere.
xdg_only = pytest.mark.skipif(sys.platform != "linux", reason="the XDG default is Linux's")


def qna_command() -> list[str]:
    # The script next to this interpreter is the one the package installed.
    script = shutil.which("qna", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "qna"]


def run(
    *args: str, env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [*qna_command(), *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )
    assert "Traceback" not in completed.stderr
    return completed


@pytest.fixture
def env(fake_openai: FakeOpenAI, tmp_path: Path) -> dict[str, str]:
    """The environment of a user with no database configured yet."""
    home = tmp_path / "home"
    return {
        **settings_free_environ(),
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "OPENAI_BASE_URL": fake_openai.base_url,
    }


@pytest.fixture
def db_env(env: dict[str, str], database_url: str) -> dict[str, str]:
    return {**env, "DATABASE_URL": database_url}


# Ctrl-C and SIGTERM, each with the exit code and the line qna tells it with.
EACH_INTERRUPT = pytest.mark.parametrize(
    ("signum", "exit_code", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)


def ask_json(question: str, env: dict[str, str]) -> Any:
    completed = run("ask", "--json", question, env=env)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_ask_prints_exactly_the_answer(
    fake_openai: FakeOpenAI, db_env: dict[str, str], database_url: str
) -> None:
    # Some latency, so a progress indicator would have time to draw if it were shown.
    fake_openai.latency = 0.3

    completed = run("ask", QUESTION, env=db_env)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == DEFAULT_ANSWER + "\n"
    assert completed.stderr == ""
    [row] = stored_rows(database_url)
    assert (row["question"], row["status"]) == (QUESTION, "answered")


def test_ask_reads_the_question_from_a_pipe(
    fake_openai: FakeOpenAI, db_env: dict[str, str]
) -> None:
    completed = run("ask", "-", env=db_env, input=QUESTION + "\n")

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == DEFAULT_ANSWER + "\n"
    assert fake_openai.requests[0]["messages"][0]["content"] == QUESTION


def test_history_and_show_after_ask(db_env: dict[str, str]) -> None:
    asked = ask_json(QUESTION, db_env)

    history = run("history", "--json", env=db_env)
    assert history.returncode == 0, history.stderr
    assert [item["id"] for item in json.loads(history.stdout)["items"]] == [asked["id"]]

    text = run("history", env=db_env)
    assert asked["id"] in text.stdout and QUESTION in text.stdout

    shown = run("show", "--json", asked["id"], env=db_env)
    assert json.loads(shown.stdout) == asked


@pytest.mark.parametrize(
    ("args", "stdin", "exit_code"),
    [
        pytest.param(("ask", ""), None, 4, id="empty-question"),
        pytest.param(("ask", "-"), "a\x00b", 4, id="nul-on-stdin"),
        pytest.param(("ask", "x" * 4001), None, 4, id="too-long"),
        pytest.param(("show", str(uuid4())), None, 5, id="unknown-id"),
        pytest.param(("show", "garbage"), None, 5, id="not-an-id"),
        pytest.param(("history", "--cursor", "bogus"), None, 4, id="bad-cursor"),
        pytest.param(("ask", "--bogus", QUESTION), None, 2, id="unknown-option"),
        pytest.param(("show",), None, 2, id="missing-argument"),
    ],
)
def test_an_error_is_one_line_and_its_exit_code(
    fake_openai: FakeOpenAI,
    db_env: dict[str, str],
    database_url: str,
    args: tuple[str, ...],
    stdin: str | None,
    exit_code: int,
) -> None:
    completed = run(*args, env=db_env, input=stdin)

    assert completed.returncode == exit_code
    error_line(completed.stderr)
    assert completed.stdout == ""
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


@pytest.mark.parametrize(
    ("status", "exit_code", "error_kind"),
    [(503, 7, "llm_unavailable"), (429, 8, "llm_rate_limited"), (401, 10, "llm_refused")],
)
def test_an_llm_failure_exits_with_its_code_and_is_recorded(
    fake_openai: FakeOpenAI,
    db_env: dict[str, str],
    database_url: str,
    status: int,
    exit_code: int,
    error_kind: str,
) -> None:
    fake_openai.script(Status(status))

    completed = run("ask", QUESTION, env={**db_env, "QNA_LLM_MAX_ATTEMPTS": "1"})

    assert completed.returncode == exit_code
    line = error_line(completed.stderr)
    [row] = stored_rows(database_url)
    assert (row["status"], row["error_kind"]) == ("failed", error_kind)
    assert f"(recorded as {row['id']})" in line


def test_no_api_key_exits_3(db_env: dict[str, str]) -> None:
    del db_env["OPENAI_BASE_URL"]

    completed = run("ask", QUESTION, env=db_env)

    assert completed.returncode == 3
    assert "OPENAI_API_KEY" in error_line(completed.stderr)


def test_an_invalid_setting_exits_3(db_env: dict[str, str]) -> None:
    completed = run("ask", QUESTION, env={**db_env, "QNA_LLM_MAX_ATTEMPTS": "abc"})

    assert completed.returncode == 3
    assert "QNA_LLM_MAX_ATTEMPTS" in error_line(completed.stderr)


def test_serve_refuses_a_rate_limit_storage_it_cannot_use(env: dict[str, str]) -> None:
    # flask-limiter would refuse it only in each worker, after gunicorn had started.
    env = {**env, "QNA_RATE_LIMIT": "10/minute", "QNA_RATE_LIMIT_STORAGE": "foo://"}

    completed = run("serve", "--port", "0", "--workers", "1", env=env)

    assert completed.returncode == 3
    assert "QNA_RATE_LIMIT_STORAGE" in error_line(completed.stderr)


def test_serve_refuses_a_cors_origin_that_is_not_one(env: dict[str, str]) -> None:
    # With a path, a browser's Origin never matches it: the front-end would be refused
    # with nothing said on the server's side.
    env = {**env, "QNA_CORS_ORIGINS": "https://app.example.com/app"}

    completed = run("serve", "--port", "0", "--workers", "1", env=env)

    assert completed.returncode == 3
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert "QNA_CORS_ORIGINS" in error_line(completed.stderr)


def test_serve_on_a_port_in_use_is_one_line_and_exit_12(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        completed = run("serve", "--port", str(port), "--workers", "1", env=env)

    assert completed.returncode == 12
    line = error_line(completed.stderr)
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in line
    assert completed.stdout == ""


def test_serve_on_an_address_not_this_machines_is_exit_12(env: dict[str, str]) -> None:
    completed = run("serve", "--host", "192.0.2.1", "--workers", "1", env=env)  # TEST-NET-1

    assert completed.returncode == 12
    assert "cannot listen on 192.0.2.1:5000" in error_line(completed.stderr)


@pytest.mark.parametrize("host", ["fe80::1", "fe80::1%lo"])
def test_serve_on_a_link_local_address_says_why_it_cannot(env: dict[str, str], host: str) -> None:
    # The kernel needs such an address's interface; gunicorn cannot pass one, so the
    # bind fails with a bare "invalid argument".
    completed = run("serve", "--host", host, "--workers", "1", env=env)

    assert completed.returncode == 12
    line = error_line(completed.stderr)
    assert f"cannot listen on [{host}]:5000: a link-local address (fe80::/10)" in line
    assert "use --host ::" in line


def test_an_unreachable_database_exits_6(fake_openai: FakeOpenAI, env: dict[str, str]) -> None:
    env["DATABASE_URL"] = "postgresql://u:p@127.0.0.1:1/x"

    completed = run("ask", QUESTION, env=env)

    assert completed.returncode == 6
    error_line(completed.stderr)
    assert fake_openai.calls == 0


@xdg_only
def test_without_database_url_records_go_to_the_xdg_data_dir(
    env: dict[str, str], tmp_path: Path
) -> None:
    data_home = tmp_path / "xdg-data"
    env["XDG_DATA_HOME"] = str(data_home)
    expected = data_home / "qna" / "qna.db"

    asked = ask_json(QUESTION, env)

    assert expected.is_file()
    [row] = stored_rows(f"sqlite:///{expected}")
    assert row["id"] == UUID(asked["id"])
    history = run("history", "--json", env=env)
    assert [item["id"] for item in json.loads(history.stdout)["items"]] == [asked["id"]]


@xdg_only
def test_without_xdg_data_home_records_go_under_home(env: dict[str, str], tmp_path: Path) -> None:
    del env["XDG_DATA_HOME"]
    expected = tmp_path / "home" / ".local" / "share" / "qna" / "qna.db"

    asked = ask_json(QUESTION, env)

    [row] = stored_rows(f"sqlite:///{expected}")
    assert row["id"] == UUID(asked["id"])


def test_python_dash_m_qna_is_the_same_command(env: dict[str, str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "qna", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0
    assert completed.stdout.startswith("qna, version ")


@pytest.mark.parametrize("args", [("--help",), ("ask", "--help"), ("--version",)])
def test_help_and_version_exit_0_with_no_settings(args: tuple[str, ...], tmp_path: Path) -> None:
    completed = run(*args, env={**settings_free_environ(), "HOME": str(tmp_path)})

    assert completed.returncode == 0
    assert completed.stdout.strip()
    assert completed.stderr == ""


def run_with_terminal_stderr(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run qna with stderr on a pseudo-terminal (as a person at a shell sees it) and
    stdout on a pipe; returns the exit code, stdout and everything the terminal got."""
    controller, terminal = pty.openpty()
    try:
        with tempfile.TemporaryFile() as stdout_file:
            process = subprocess.Popen(
                [*qna_command(), *args], env=env, stdout=stdout_file, stderr=terminal
            )
            os.close(terminal)
            terminal = -1
            try:
                shown = _read_until_closed(controller, deadline=time.monotonic() + 60)
                code = process.wait(timeout=10)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            stdout_file.seek(0)
            stdout = stdout_file.read().decode()
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    assert "Traceback" not in shown
    return code, stdout, shown


def test_ask_dash_at_a_terminal_says_how_to_end_the_question(
    db_env: dict[str, str], fake_openai: FakeOpenAI
) -> None:
    # Waiting on a terminal without a word, it looked as if qna had hung.
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [*qna_command(), "ask", "-"],
            env=db_env,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        deadline = time.monotonic() + 30
        while b"Ctrl-D" not in shown:
            assert time.monotonic() < deadline, f"no prompt; the terminal shows {shown!r}"
            if select.select([controller], [], [], 0.1)[0]:
                shown += os.read(controller, 4096)
        os.write(controller, b"What is 2+2?\n\x04")
        stdout, _ = process.communicate(timeout=30)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)

    assert process.returncode == 0
    assert shown.decode().startswith("Type the question; end it with Ctrl-D on a line of its own.")
    assert stdout == DEFAULT_ANSWER + "\n"
    assert fake_openai.requests[0]["messages"][0]["content"] == "What is 2+2?"


def _read_until_closed(fd: int, *, deadline: float) -> str:
    """Everything written to the terminal until the process closes it (EIO on Linux)."""
    shown = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"qna still running; the terminal shows {shown!r}"
        if not select.select([fd], [], [], remaining)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every holder of the terminal's other end closed it
            return shown.decode()
        if not chunk:
            return shown.decode()
        shown += chunk


CLEAR_LINE = "\r\x1b[K"


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_spinner_shows_on_a_terminal_while_waiting_and_is_wiped(
    fake_openai: FakeOpenAI, db_env: dict[str, str]
) -> None:
    fake_openai.latency = 0.5  # long enough for several frames

    code, stdout, shown = run_with_terminal_stderr("ask", QUESTION, env=db_env)

    assert code == 0, shown
    assert stdout == DEFAULT_ANSWER + "\n"  # the answer alone: no frame reaches stdout
    frames = [part for part in shown.split("\r") if part.strip() and part != "\x1b[K"]
    assert len(frames) >= 2, shown
    assert all(frame[0] in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" for frame in frames), shown
    assert shown.endswith(CLEAR_LINE), shown  # the line is left blank


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_an_error_on_a_terminal_is_one_clean_line_after_the_spinner(
    fake_openai: FakeOpenAI, db_env: dict[str, str]
) -> None:
    fake_openai.script(Delay(5))  # longer than the request may take

    code, stdout, shown = run_with_terminal_stderr(
        "ask", QUESTION, env={**db_env, "QNA_LLM_MAX_ATTEMPTS": "1", "QNA_LLM_TIMEOUT_S": "0.5"}
    )

    assert code == 9  # the LLM timed out
    assert stdout == ""
    assert CLEAR_LINE in shown, shown
    # What stays on the screen once the spinner has wiped its line: the error alone.
    error_line(shown.rsplit(CLEAR_LINE, 1)[1].replace("\r\n", "\n"))


def test_a_reader_that_goes_away_ends_qna_quietly(
    fake_openai: FakeOpenAI, db_env: dict[str, str], database_url: str
) -> None:
    # Like `qna ask ... | head -c0`: the pipe's reader is gone before qna writes.
    process = subprocess.Popen(
        [*qna_command(), "ask", QUESTION],
        env=db_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()

    assert process.wait(timeout=60) == 141, stderr
    assert stderr == ""
    [row] = stored_rows(database_url)
    assert row["status"] == "answered"  # the answer is kept all the same


def run_closing(
    redirection: str, *args: str, env: dict[str, str], memory_limit_kb: int | None = None
) -> subprocess.CompletedProcess[str]:
    """qna run from a shell with a stream closed (`2>&-`, `<&-`) or redirected."""
    limit = f"ulimit -v {memory_limit_kb}; " if memory_limit_kb else ""
    return subprocess.run(
        ["sh", "-c", f'{limit}exec "$@" {redirection}', "sh", *qna_command(), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ask_with_stderr_closed_still_asks(
    fake_openai: FakeOpenAI, db_env: dict[str, str], database_url: str
) -> None:
    # `qna ask ... 2>&-` from a cron job: there is no terminal to draw a spinner on,
    # which is no reason to fail (it exited 1, silently, having asked nothing).
    completed = run_closing("2>&-", "ask", QUESTION, env=db_env)

    assert completed.returncode == 0
    assert completed.stdout == DEFAULT_ANSWER + "\n"
    [row] = stored_rows(database_url)
    assert row["status"] == "answered"


def test_ask_dash_with_stdin_closed_exits_4(
    fake_openai: FakeOpenAI, db_env: dict[str, str], database_url: str
) -> None:
    completed = run_closing("<&-", "ask", "-", env=db_env)

    assert completed.returncode == 4, completed.stderr
    assert "standard input" in error_line(completed.stderr)
    assert stored_rows(database_url) == []
    assert fake_openai.calls == 0


def test_a_question_argument_that_is_not_utf8_exits_4(
    fake_openai: FakeOpenAI, db_env: dict[str, str], database_url: str
) -> None:
    completed = subprocess.run(
        [*qna_command(), "ask", b"caf\xe9 ?"],
        env=db_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 4, completed.stderr
    assert "not valid UTF-8" in error_line(completed.stderr)
    assert stored_rows(database_url) == []


@pytest.mark.parametrize("host", ["", " "])
def test_serve_refuses_an_empty_host(env: dict[str, str], host: str) -> None:
    # `--host "$HOST"` with HOST unset listened on every address of the machine.
    completed = run("serve", "--host", host, "--port", "0", "--workers", "1", env=env)

    assert completed.returncode == 2
    assert "--host" in error_line(completed.stderr)
    assert completed.stdout == ""


@pytest.mark.parametrize(
    "host", ["http://127.0.0.1", "localhost:5152", "127.0.0.1/24", "[::1]:5000"]
)
def test_serve_says_a_url_or_host_and_port_is_no_host(env: dict[str, str], host: str) -> None:
    # Told as an address that cannot be listened on (exit 12, "name or service not
    # known"), as if the name were wrong rather than its form.
    completed = run("serve", "--host", host, "--port", "0", "--workers", "1", env=env)

    assert completed.returncode == 2
    assert error_line(completed.stderr) == (
        "qna: error: Invalid value for '--host': is a host name or address alone; the port "
        "goes in --port. See 'qna serve --help'."
    )


def test_commands_started_together_on_a_new_sqlite_file_all_migrate_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    # `xargs -P` on a fresh machine: each process found no schema and created it,
    # and the losers failed with "table alembic_version already exists" (exit 6).
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'race-{attempt}.db'}"
        processes = [
            subprocess.Popen(
                [*qna_command(), "db", "upgrade"],
                env={**env, "DATABASE_URL": url},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        outcomes = [
            (process.communicate(timeout=60)[1], process.returncode) for process in processes
        ]

        assert outcomes == [("", 0)] * len(processes)
        engine = create_engine(url)
        try:
            assert migrate.is_at_head(engine)
        finally:
            engine.dispose()


def test_output_in_an_encoding_without_the_characters_is_not_a_crash(
    db_env: dict[str, str],
) -> None:
    # Redirected on Windows the output is cp1252, and a stored emoji was an internal
    # error (UnicodeEncodeError) for `history`, `show` and `--json` alike.
    asked = ask_json("Can you read 😀 ?", db_env)
    latin1 = {**db_env, "PYTHONIOENCODING": "latin-1"}

    as_json = run("history", "--json", env=latin1)
    text = run("history", env=latin1)
    shown = run("show", asked["id"], env=latin1)

    assert (as_json.returncode, text.returncode, shown.returncode) == (0, 0, 0), (
        as_json.stderr + text.stderr + shown.stderr
    )
    assert json.loads(as_json.stdout)["items"][0]["question"] == "Can you read 😀 ?"
    assert "Can you read ? ?" in text.stdout
    assert "question: Can you read ? ?" in shown.stdout


@EACH_INTERRUPT
def test_an_interrupt_while_the_llm_thinks_closes_the_record(
    fake_openai: FakeOpenAI,
    db_env: dict[str, str],
    database_url: str,
    signum: int,
    exit_code: int,
    said: str,
) -> None:
    # The record stayed pending, as if still being answered, until it was old enough
    # to count as abandoned (the LLM deadline and a minute later). SIGTERM is what
    # `timeout 10 qna ask ...` and job runners send.
    fake_openai.latency = 30
    process = subprocess.Popen(
        [*qna_command(), "ask", QUESTION],
        env=db_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while fake_openai.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=30)

    assert process.returncode == exit_code, stderr
    assert error_line(stderr) == f"qna: error: {said}"
    assert stdout == ""
    [row] = stored_rows(database_url)
    assert (row["status"], row["error_kind"]) == ("failed", "abandoned")


@pytest.mark.postgres
@EACH_INTERRUPT
def test_an_interrupt_while_postgresql_makes_it_wait_ends_the_command_at_once(
    fake_openai: FakeOpenAI,
    env: dict[str, str],
    postgres_url: str,
    signum: int,
    exit_code: int,
    said: str,
) -> None:
    # libpq waits in C, where Python runs no signal handler: the interrupt took
    # effect only once the statement ended, QNA_DB_STATEMENT_TIMEOUT_S later.
    before = stored_rows(postgres_url)
    holder = create_engine(postgres_url)
    try:
        # Watched from another connection: within the lock's transaction, the
        # activity view would keep showing the snapshot it first took.
        with holder.connect() as locking, holder.connect() as watching:
            locking.execute(text("LOCK TABLE qn_a IN ACCESS EXCLUSIVE MODE"))
            process = subprocess.Popen(
                [*qna_command(), "ask", QUESTION],
                env={**env, "DATABASE_URL": postgres_url, "QNA_DB_STATEMENT_TIMEOUT_S": "60"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            _wait_until_waiting_on_a_lock(watching, process)
            process.send_signal(signum)
            stdout, stderr = process.communicate(timeout=5)  # not 60: at once
            # The server stopped the statement too: nothing waits behind the lock.
            assert _waiting_on_a_lock(watching) == 0
            locking.rollback()
    finally:
        holder.dispose()

    assert process.returncode == exit_code, stderr
    assert stderr == f"qna: error: {said}\n"
    assert stdout == ""
    assert fake_openai.calls == 0
    assert stored_rows(postgres_url) == before  # the insert that waited never happened


def _waiting_on_a_lock(connection: Connection) -> int:
    connection.rollback()  # a fresh snapshot of the activity view
    return int(
        connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    )


def _wait_until_waiting_on_a_lock(connection: Connection, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while _waiting_on_a_lock(connection) == 0:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "qna never reached the locked table"
        time.sleep(0.05)


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.35])
def test_ctrl_c_while_python_loads_qna_is_one_line_not_a_traceback(
    fake_openai: FakeOpenAI, env: dict[str, str], delay: float
) -> None:
    # In the first fraction of a second Python is still importing the command's
    # modules, before any of qna's own code runs: a Ctrl-C there printed the import's
    # traceback.
    fake_openai.latency = 30
    process = subprocess.Popen(
        [*qna_command(), "ask", QUESTION],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _stdout, stderr = process.communicate(timeout=30)

    assert "Traceback" not in stderr
    # Killed by the signal itself, when it lands before Python handles it.
    assert process.returncode in (130, -signal.SIGINT), stderr
    if process.returncode == 130:
        assert error_line(stderr) == "qna: error: interrupted"


# Ctrl-C at the moment Python starts importing a module, in a real `qna` process: a
# sitecustomize (loaded by Python's own start-up, before the script) signals the
# process itself then, once. Unlike a timer, this lands where it is aimed on any
# machine; and unlike one, it never lands in the interpreter's own start-up, where
# Python prints a traceback of its own ("Failed to import the site module") whatever
# the program.
CTRL_C_AT_IMPORT = """
import os
import sys


class CtrlCAt:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == os.environ["QNA_TEST_CTRL_C_AT"]:
            sys.meta_path.remove(self)
            open(os.environ["QNA_TEST_CTRL_C_FIRED"], "w").close()
            os.kill(os.getpid(), int(os.environ["QNA_TEST_CTRL_C_SIGNAL"]))
        return None


sys.meta_path.insert(0, CtrlCAt())
"""


def interrupt_at_import(
    tmp_path: Path, module: str, signum: int = signal.SIGINT, *, hook: str = ""
) -> tuple[dict[str, str], Path]:
    """The environment of a `qna` process that sends itself `signum` as it starts
    importing `module` (CTRL_C_AT_IMPORT, and `hook` beside it), and the file whose
    existence says it did."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(CTRL_C_AT_IMPORT + hook)
    fired = tmp_path / "fired"
    return {
        "PYTHONPATH": str(tmp_path / "hook"),
        "QNA_TEST_CTRL_C_AT": module,
        "QNA_TEST_CTRL_C_FIRED": str(fired),
        "QNA_TEST_CTRL_C_SIGNAL": str(int(signum)),
    }, fired


@pytest.mark.parametrize(
    "module",
    [
        # What `import qna` loaded before the command's handler was on (the exported
        # errors and use cases: some 60 ms, the traceback's usual place).
        "qna.domain",
        "qna.domain.errors",
        "qna.application",
        "qna.application.use_cases",
        # And once it is: the command itself.
        "qna.entrypoints.cli",
        "click",
        "qna.config",
    ],
)
def test_ctrl_c_while_python_starts_qna_is_one_line_and_exit_130(
    tmp_path: Path, module: str
) -> None:
    interrupting, fired = interrupt_at_import(tmp_path, module)
    env = {**settings_free_environ(), "HOME": str(tmp_path / "home"), **interrupting}

    completed = subprocess.run(
        [*qna_command(), "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert fired.exists(), f"{module} was not imported: the test interrupted nothing"
    assert "Traceback" not in completed.stderr
    assert completed.returncode == 130, completed.stderr
    assert error_line(completed.stderr) == "qna: error: interrupted"


# Registered before qna's own exit callbacks, so it runs after them all: the signal
# arrives in the last moments of the interpreter's shutdown.
SIGNAL_AT_EXIT = """
import atexit
import os
import time


def _signal_self():
    os.kill(os.getpid(), int(os.environ["QNA_TEST_EXIT_SIGNAL"]))
    time.sleep(0.2)  # delivered, and handled, before the interpreter is gone


atexit.register(_signal_self)
"""


@EACH_INTERRUPT
def test_a_signal_once_the_command_is_over_changes_nothing(
    env: dict[str, str], tmp_path: Path, signum: int, exit_code: int, said: str
) -> None:
    # The answer is out and the exit status decided; Ctrl-C or SIGTERM during the
    # interpreter's shutdown printed "Exception ignored in atexit callback" and a
    # traceback (or click's "Aborted!", exit 1, a moment earlier).
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SIGNAL_AT_EXIT)
    hooked = {**env, "PYTHONPATH": str(tmp_path / "hook"), "QNA_TEST_EXIT_SIGNAL": str(signum)}

    completed = run("ask", QUESTION, env=hooked)

    assert (completed.returncode, completed.stderr) == (0, ""), completed.stderr
    assert completed.stdout == f"{DEFAULT_ANSWER}\n"


# And, at exit, whether a module finished loading (a module whose import was broken
# off is not in sys.modules).
LOADED_AT_EXIT = """
import atexit


def _tell_loaded():
    with open(os.environ["QNA_TEST_LOADED_OUT"], "w") as out:
        out.write(str(os.environ["QNA_TEST_LOADED"] in sys.modules))


atexit.register(_tell_loaded)
"""


@pytest.mark.parametrize(
    ("module", "loaded"),
    [
        # `qna ask` loads the container (SQLAlchemy, dependency-injector: ~0.5 s)...
        ("qna.container", "qna.container"),
        ("dependency_injector.providers", "qna.container"),
        ("sqlalchemy", "qna.container"),
        # ...then the SDK (~1 s), before it touches the database or the LLM.
        ("openai", "qna.adapters.openai_llm"),
        ("openai.types.chat", "qna.adapters.openai_llm"),
    ],
)
@EACH_INTERRUPT
def test_an_interrupt_while_ask_loads_its_modules_lets_them_load_then_exits(
    fake_openai: FakeOpenAI,
    env: dict[str, str],
    tmp_path: Path,
    module: str,
    loaded: str,
    signum: int,
    exit_code: int,
    said: str,
) -> None:
    # Raised in the middle of these imports, the KeyboardInterrupt could land in
    # Python code that pydantic-core runs while it builds the SDK's models, and come
    # out as a SchemaError: "internal error", exit 1. Held until they are loaded, it
    # cannot land there: the module is whole at exit, and the ask never started.
    interrupting, fired = interrupt_at_import(tmp_path, module, signum, hook=LOADED_AT_EXIT)
    loaded_out = tmp_path / "loaded"
    hooked = {
        **env,
        **interrupting,
        "QNA_TEST_LOADED": loaded,
        "QNA_TEST_LOADED_OUT": str(loaded_out),
    }

    completed = run("ask", QUESTION, env=hooked)

    assert fired.exists(), f"{module} was not imported: the test interrupted nothing"
    assert "Traceback" not in completed.stderr
    assert completed.returncode == exit_code, completed.stderr
    assert error_line(completed.stderr) == f"qna: error: {said}"
    assert loaded_out.read_text() == "True", f"{loaded} was left half-loaded"
    assert fake_openai.calls == 0


# Starts a program with SIGINT ignored, as a shell starts a background job (`qna ask
# ... &` in a script): the ignoring survives exec.
STARTED_IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.mark.parametrize(
    ("args", "module"),
    [
        # While the command's own modules load (console.main holds SIGINT there)...
        (("--version",), "qna.entrypoints.cli"),
        # ...and while `qna ask` loads the container and the SDK (cli holds it there).
        (("ask", QUESTION), "qna.container"),
        (("ask", QUESTION), "openai"),
    ],
)
def test_a_sigint_the_process_was_started_ignoring_stays_ignored(
    fake_openai: FakeOpenAI, env: dict[str, str], tmp_path: Path, args: tuple[str, ...], module: str
) -> None:
    # The terminal's Ctrl-C is not for a background job: holding SIGINT while modules
    # load, and putting the handler back after, must not turn it on for one.
    interrupting, fired = interrupt_at_import(tmp_path, module)
    hooked = {**env, **interrupting}
    completed = subprocess.run(
        [sys.executable, "-c", STARTED_IGNORING_SIGINT, *qna_command(), *args],
        env=hooked,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert fired.exists(), f"{module} was not imported: the test interrupted nothing"
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    if args[0] == "ask":
        assert completed.stdout == DEFAULT_ANSWER + "\n"
        assert fake_openai.calls == 1


@pytest.mark.parametrize(
    "redirection",
    [
        ">&-",
        pytest.param(
            ">/dev/full",
            marks=pytest.mark.skipif(not Path("/dev/full").exists(), reason="Linux's full disk"),
        ),
    ],
    ids=["closed", "disk-full"],
)
@pytest.mark.parametrize(
    "args",
    [("ask", QUESTION), ("history",), ("-h",), ("ask", "--help"), ("db", "--help"), ("-V",)],
    ids=["ask", "history", "help", "command-help", "group-help", "version"],
)
def test_output_that_cannot_be_written_is_one_line_and_exit_1(
    db_env: dict[str, str], redirection: str, args: tuple[str, ...]
) -> None:
    # Closed, the output vanished and qna exited 0; on a full disk it was called an
    # internal error, naming OSError (the help and the version: a traceback).
    ask_json(QUESTION, db_env)  # something for history to list

    completed = run_closing(redirection, *args, env=db_env)

    assert completed.returncode == 1
    line = error_line(completed.stderr)
    assert line.startswith("qna: error: cannot write the output: ")
    assert "internal error" not in line


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="Linux's full disk")
@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("show", "3f0c2c4e-8d3a-4f43-9a57-3f7f1f0a8b11"), 5),
        (("ask", "   "), 4),
        (("history", "--bogus"), 2),
        (("history",), 0),  # "No questions yet." on stderr
    ],
    ids=["not-found", "invalid-question", "usage", "empty-history"],
)
def test_an_exit_code_stands_when_stderr_cannot_be_written(
    db_env: dict[str, str], args: tuple[str, ...], code: int
) -> None:
    # `2>/dev/full` (stderr's disk full): the error line could not be written, and
    # that failure replaced the exit code a script acts on with 1.
    completed = run_closing("2>/dev/full", *args, env=db_env)

    assert completed.returncode == code


def test_serve_takes_an_ipv6_host_in_brackets(env: dict[str, str]) -> None:
    # Written as in a URL (and as gunicorn's --bind takes it), it was looked up as
    # a host name: "cannot listen on [[::1]]:5000: name or service not known".
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        completed = run("serve", "--host", "[::1]", "--port", str(port), env=env)

    assert completed.returncode == 12
    assert f"cannot listen on [::1]:{port}: address already in use" in error_line(completed.stderr)


def test_a_question_stream_that_never_ends_is_refused_unread(
    db_env: dict[str, str], database_url: str
) -> None:
    # `yes | qna ask -`: all of stdin was read before its length was checked, until
    # memory ran out (here capped, so that it ends as a MemoryError).
    env = {**db_env, "QNA_MAX_QUESTION_LENGTH": "100"}

    completed = run_closing("</dev/zero", "ask", "-", env=env, memory_limit_kb=1_000_000)

    assert completed.returncode == 4, completed.stderr
    assert "standard input" in error_line(completed.stderr)
    assert stored_rows(database_url) == []
