"""The `qna` command: ask, read the history, migrate, serve."""

from __future__ import annotations

import codecs
import errno
import io
import itertools
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import wraps
from importlib.metadata import version
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from qna.application.use_cases import FindQnA, InvalidArgument, ListQnA, decode_cursor
from qna.config import ConfigurationError, Settings, misread_variables
from qna.domain.errors import (
    InvalidQuestion,
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
    NotFound,
    OutcomeNotStored,
    StorageUnavailable,
)
from qna.domain.model import QnA, Status, parse_question
from qna.entrypoints.console import SignalsHeld
from qna.entrypoints.presenters import qna_to_dict

if TYPE_CHECKING:
    from qna.container import Container

# Documented in the README ("Exit codes"); scripts may rely on them.
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CODES: list[tuple[type[Exception], int]] = [
    (ConfigurationError, 3),
    (InvalidQuestion, 4),
    (InvalidArgument, 4),
    (NotFound, 5),
    (StorageUnavailable, 6),
    (LLMUnavailable, 7),
    (LLMRateLimited, 8),
    (LLMTimeout, 9),
    (LLMRefused, 10),
    (LLMBadResponse, 11),
    (LLMError, 7),
]

P = ParamSpec("P")
R = TypeVar("R")


# As a shell reports a process that SIGPIPE ended (128 + 13).
EXIT_BROKEN_PIPE = 141
# `qna serve` cannot listen on its --host and --port (in use, say).
EXIT_CANNOT_LISTEN = 12
# Whitespace `qna ask -` reads beyond the longest question's bytes before refusing.
STDIN_SLACK_BYTES = 64 * 1024
# As a shell reports a process that SIGINT ended (128 + 2).
EXIT_INTERRUPTED = 130
# As a shell reports a process that SIGTERM ended (128 + 15).
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a job runner stopping qna), met as Ctrl-C is: an ask
    in flight closes its record as abandoned instead of leaving it pending until it is
    old enough to count as abandoned (AskQuestion handles KeyboardInterrupt so)."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def exit_code_for(error: Exception) -> int:
    if isinstance(error, OutcomeNotStored) and error.llm_error is not None:
        # The LLM failed, then so did storing that: the LLM's failure is why there is
        # no answer, and what a script should act on (back off, fix the key), as it
        # would had the failure been stored. The line tells the database's too.
        error = error.llm_error
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


# Control characters (C0, DEL, C1) but newline, tab and the CR of a CRLF line end; and
# the bidirectional embedding, override and isolate controls (U+202A-U+202E,
# U+2066-U+2069), which reorder what the terminal shows after them ("Trojan Source":
# `\u202e` makes "0001$" read "$1000"). Right-to-left letters and the marks LRM, RLM
# and ALM (U+200E, U+200F, U+061C) reorder nothing, and are left as they are.
# Of these, JSON leaves DEL, C1 and the bidi controls raw in a string (see emit_json).
_DEL_C1_AND_BIDI = r"\x7f-\x9f\u202a-\u202e\u2066-\u2069"
_CONTROL_CHARACTERS = re.compile(rf"\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f{_DEL_C1_AND_BIDI}]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with its control characters shown escaped (ESC as `\\x1b`, RLO as
    `\\u202e`): what an LLM wrote is for the terminal to show, not to obey (an escape
    sequence can retitle the window, redraw the screen, set the clipboard; a bidi
    override can make the text read otherwise than it is).

    On a terminal or not: piped text reaches one too (`| less -R`, `cat` of a file),
    and the output should not depend on where it goes. `--json` is the exact text."""
    return _CONTROL_CHARACTERS.sub(_escaped, text)


def error_line(message: str) -> str:
    # One line, never a traceback: the message is for a person at a terminal, and
    # may quote what the LLM's server said.
    return f"qna: error: {printable(' '.join(message.split()))}"


class OutputError(Exception):
    """Standard output cannot be written: closed (`>&-`), or its disk is full."""


def say(text: str) -> None:
    """Write a line of the command's human-readable output on stdout (see `printable`)."""
    write_line(printable(text))


def write_line(text: str) -> None:
    """Write a line on stdout as it is."""
    if sys.stdout is None:  # click would drop the line, and qna exit 0
        raise OutputError("standard output is closed")
    try:
        click.echo(text)
    except BrokenPipeError:
        raise  # the reader went away: see handles_errors
    except OSError as exc:
        raise OutputError((exc.strerror or str(exc)).lower()) from exc


def fail(message: str, code: int) -> None:
    tell(error_line(message))
    sys.exit(code)


def tell(line: str, file: IO[Any] | None = None) -> None:
    """Write a line for the person on stderr (or `file`). A stderr that cannot take it
    (`2>/dev/full`) does not change the exit code: that is all a script has left."""
    with suppress(OSError):
        click.echo(line, file=file, err=True)


class OneLineUsageError(click.UsageError):
    """A usage error told like every other error: one line on stderr, with a pointer
    to the help instead of Click's usage line, blank line and "Error:" line."""

    def show(self, file: IO[Any] | None = None) -> None:
        message = self.format_message().strip()
        if message and message[-1] not in ".?!":
            message += "."
        ctx = self.ctx
        if ctx is not None and ctx.command.get_help_option(ctx) is not None:
            message += f" See '{ctx.command_path} --help'."
        tell(error_line(message), file)


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except OneLineUsageError:
        raise
    except click.UsageError as exc:
        # One that shows something else (`qna` alone shows the help) is left to show it.
        if type(exc).show is not click.UsageError.show:
            raise
        raise OneLineUsageError(exc.format_message(), exc.ctx) from None


def _show_help(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _write_or_fail(ctx.get_help())
        ctx.exit()


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _write_or_fail(f"qna, version {version('qna')}")
        ctx.exit()


class QnACommand(click.Command):
    """A `qna` command, whose usage errors all know their command, and whose help
    output that cannot be written is an error as any output's is."""

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)
        if option is not None:
            # Click's own wrote through `echo`: to a closed stdout nothing (exit 0),
            # and a full disk's OSError escaped as a traceback.
            option.callback = _show_help
        return option

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # click's parser takes them off the list as it reads them
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            # Click's parser raises some without it (an option missing its value, a
            # flag given one), and the error line could not name the command's --help.
            if exc.ctx is None:
                exc.ctx = ctx
            hint = _how_to_give_a_question(exc, given) if self.name == "ask" else ""
            if hint:
                raise OneLineUsageError(f"{exc.format_message().rstrip('.')}{hint}", ctx) from None
            raise


def _how_to_give_a_question(error: click.UsageError, args: list[str]) -> str:
    """What to do instead, when `qna ask`'s arguments read as a question not quoted
    (`qna ask What is 2+2`) or one that starts with "-" (`qna ask "-5 squared?"`)."""
    if isinstance(error, click.NoSuchOption):
        # A lone argument "-5 ..." is a question (`ask` has no short option but -h);
        # among others, "-v" or "-json" may well be a mistyped option.
        alone = len(args) == 1 and args[0].startswith(error.option_name)
        if alone and not error.option_name.startswith("--"):
            return '; to ask a question that starts with "-", put -- before it'
        return ""
    if error.message.startswith("Got unexpected extra argument"):
        return "; put the whole question in quotes"
    return ""


class QnAGroup(QnACommand, click.Group):
    """The `qna` group. Click reports a usage error where `main` catches it, after
    parsing; the group's own parsing and everything it invokes (every subcommand's
    parsing included) happen inside these two methods."""

    command_class = QnACommand
    group_class = type  # `qna db` is one of these too

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)


def handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn every expected failure into one line on stderr and its exit code."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (ConfigurationError, InvalidQuestion, InvalidArgument, NotFound) as exc:
            fail(str(exc), exit_code_for(exc))
        except (StorageUnavailable, LLMError) as exc:
            fail(failure_message(exc), exit_code_for(exc))
        except Terminated:
            fail("terminated", EXIT_TERMINATED)
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except OutputError as exc:
            fail(f"cannot write the output: {exc}", EXIT_INTERNAL)
        except BrokenPipeError:
            # The reader went away (`qna history | head -1`): nothing to tell anyone.
            # Point stdout at /dev/null so the interpreter's last flush stays quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        except Exception as exc:
            fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
        raise AssertionError("unreachable")

    return wrapper


_write_or_fail = handles_errors(write_line)


def failure_message(error: StorageUnavailable | LLMError) -> str:
    """The error line of a failed ask or read: the error, and what became of the record."""
    if isinstance(error, OutcomeNotStored) and error.llm_error is not None:
        return error.both_failures(error.llm_error)
    return f"{error}{record_note(error)}"


def record_note(error: StorageUnavailable | LLMError) -> str:
    """What became of the ask's record, for an error raised after it was stored."""
    if isinstance(error, LLMError) and error.qna_id is not None:
        return f" (recorded as {error.qna_id})"
    if isinstance(error, OutcomeNotStored):
        return f" (not stored: record {error.qna.id} stays pending)"
    return ""


class AppContext:
    """Builds the container on first use, so `--help` works with no settings at all
    (and fast: the container's imports load only when a command needs them)."""

    def __init__(self) -> None:
        self._container: Container | None = None
        self._migrated = False

    def container(self, *, migrate: bool = True) -> Container:
        if self._container is None:
            with interrupts_held():
                from qna.container import create_container, interruptible_database_waits

                self._container = create_container(Settings())
                if _own_process:
                    interruptible_database_waits(self._container)
            for line in misread_variables():
                tell(f"qna: warning: {line}")
        if migrate and not self._migrated:
            from qna.container import upgrade_database

            upgrade_database(self._container)
            self._migrated = True
        return self._container

    def close(self) -> None:
        # Nothing to import when nothing was built: a Ctrl-C that interrupted the
        # container's imports left them half-made, and importing again would fail.
        if self._container is None:
            return
        from qna.container import shutdown

        with interrupts_ignored():
            shutdown(self._container)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """A Ctrl-C (or SIGTERM) while a command loads what it needs (the container's
    modules, the openai package: about a second) is told once they are loaded:
    "interrupted", 130 ("terminated", 143).

    Raised in the middle of an import, the KeyboardInterrupt (SIGTERM's Terminated is
    one) could land in Python code that pydantic-core runs while it builds a model,
    and come out as its SchemaError: "internal error", exit 1. (`console.main` holds
    Ctrl-C the same way while the command's own modules load.) The interrupt wins over
    an error the loading meets meanwhile: the asker asked to stop. Never around a
    wait for the database or the LLM, which Ctrl-C must break off at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = SignalsHeld({signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminate})
    try:
        with held:
            yield
    finally:
        if held.arrived:
            raise Terminated if held.arrived[0] == signal.SIGTERM else KeyboardInterrupt


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Closing the database pool and the LLM client takes a moment and is all that is
    left to do: a Ctrl-C then (the second of two pressed after an ask, say), or a
    SIGTERM, broke it off half-way with a traceback. Ignored instead, the command ends
    as it was ending."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a signal handler (and receives signals)
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in _INTERRUPTS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: set outside Python, which cannot restore it
                signal.signal(number, handler)


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


pass_app = click.make_pass_decorator(AppContext)


@contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner on stderr while waiting, only when a person is watching it."""
    # No stderr at all (`2>&-`): nobody is watching.
    if sys.stderr is None or not sys.stderr.isatty():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
            sys.stderr.write(f"\r{frame} {message}")
            sys.stderr.flush()
            if done.wait(0.1):
                break
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        yield
    finally:
        done.set()
        spinner.join()


# What JSON leaves raw in a string but a terminal may obey: DEL, the C1 controls (a
# terminal may read U+009B as CSI, the start of an escape sequence) and the bidi
# controls. The C0 controls JSON escapes itself.
_JSON_RAW_CONTROLS = re.compile(f"[{_DEL_C1_AND_BIDI}]")


def _json_escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def emit_json(data: Any) -> None:
    # Escaped where the output's encoding lacks characters (cp1252, when redirected
    # on Windows): the same JSON, where the characters themselves were a crash.
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    escaped = codecs.lookup(encoding).name != "utf-8"
    text = json.dumps(data, ensure_ascii=escaped, indent=2)
    # Outside JSON's strings there are only ASCII characters, so each of these is in
    # one, and its \u escape is the same string to any JSON reader: still exact.
    write_line(_JSON_RAW_CONTROLS.sub(_json_escaped, text))


def print_asked(qna: QnA, *, as_json: bool) -> None:
    """What `qna ask` prints: the record with --json, else the answer if there is one."""
    if as_json:
        emit_json(qna_to_dict(qna))
    elif qna.status is Status.ANSWERED:
        say(qna.answer or "")
        if qna.is_cut_off:
            # On stderr: stdout is the answer, as the LLM gave it, for a script to read.
            tell(f"qna: note: {_CUT_OFF[qna.finish_reason or '']}")


# Why an answer is not whole (QnA.is_cut_off), for a person.
_CUT_OFF = {
    "length": "the answer is cut off: the model reached its token limit (finish_reason length).",
    "content_filter": "the answer is cut off by the provider's content filter "
    "(finish_reason content_filter).",
}


def emit_stored_failure(container: Container, error: LLMError) -> None:
    """`ask --json` after the LLM failed: the failed record, as stored and shaped as an
    answered one, so a script reads what `qna show --json` would. Nothing when it
    cannot be read back: the LLM's error is the one to report, with its exit code."""
    if error.qna_id is None:
        return
    try:
        qna = container.get_qna()(error.qna_id)
    except StorageUnavailable:
        return
    emit_json(qna_to_dict(qna))


def describe(qna: QnA) -> str:
    if qna.status is Status.ANSWERED:
        cut_off = f"[cut off: {qna.finish_reason}] " if qna.is_cut_off else ""
        return f"{cut_off}{qna.answer or ''}"
    if qna.status is Status.FAILED:
        return f"[failed: {qna.error_kind}] {qna.error_message}"
    return "[pending]"


@click.group("qna", cls=QnAGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    "-V",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and exit.",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Ask an LLM a question; every question, answer and failure is kept.

    Settings come from the environment or a .env file (see the README's settings
    table): OPENAI_API_KEY, OPENAI_BASE_URL, QNA_MODEL, DATABASE_URL, ...
    Without DATABASE_URL, records go to an embedded SQLite file.

    Text output shows control characters escaped (ESC as \\x1b), and the bidi
    controls that reorder text (RLO as \\u202e); --json is exact.
    """
    app = AppContext()
    ctx.obj = app
    ctx.call_on_close(app.close)


@cli.command()
@click.argument("question")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the whole stored record as JSON, a failed one too (with its exit code).",
)
@click.option("--fresh", is_flag=True, help="Always ask the LLM, even when the cache is on.")
@pass_app
@handles_errors
def ask(app: AppContext, question: str, as_json: bool, fresh: bool) -> None:
    """Ask QUESTION and print the answer. Use - to read the question from stdin.

    An answer the LLM cut off (its token limit, a content filter) is printed all
    the same, with a note on stderr.

    \b
    Exit codes: 0 answered, 3 configuration, 4 invalid question,
    6 database unavailable (an answer it could not store is printed all the same),
    7 LLM unavailable, 8 LLM rate-limited, 9 LLM timed out,
    10 LLM refused the request, 11 unusable LLM response.
    """
    max_length = app.container(migrate=False).config.max_question_length()
    question = read_question(question, max_length=max_length)
    # An invalid question is the asker's to fix whatever the settings: refused (exit 4)
    # before a missing API key is reported, as it would be once the key is set.
    parse_question(question, max_length=max_length)
    # A missing API key is a configuration error, reported before the database is
    # touched: with no key and no database, the key is the thing to fix first.
    with interrupts_held():
        app.container(migrate=False).llm()
    container = app.container()
    ask_question = container.ask_question()
    try:
        with progress(f"Asking {container.config.model()}…"):
            qna = ask_question(question, fresh=fresh)
    except OutcomeNotStored as exc:
        # The LLM has been paid for: its answer reaches the asker all the same.
        print_asked(exc.qna, as_json=as_json)
        raise
    except LLMError as exc:
        if as_json:
            emit_stored_failure(container, exc)
        raise
    print_asked(qna, as_json=as_json)


@cli.command()
@click.option(
    "-n",
    "--limit",
    default=ListQnA.DEFAULT_LIMIT,
    show_default=True,
    type=click.IntRange(1, ListQnA.MAX_LIMIT),
    help="How many records to show.",
)
@click.option(
    "--cursor",
    help="Continue where an earlier page ended: the cursor its last line names "
    "(with --json, its `next`).",
)
@click.option(
    "--status",
    type=click.Choice([status.value for status in Status], case_sensitive=False),
    help="Only the records in this state (an ask whose process died mid-ask is failed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print records and the next cursor as JSON.")
@pass_app
@handles_errors
def history(
    app: AppContext, limit: int, cursor: str | None, status: str | None, as_json: bool
) -> None:
    """List recent questions, newest first.

    \b
    Exit codes: 0 listed (also when there is nothing to list), 3 configuration,
    4 a cursor this command did not give out, 6 database unavailable.
    """
    if cursor is not None:
        decode_cursor(cursor)  # wrong on its face: said so before the database is opened
    page = app.container().list_qna()(limit=limit, cursor=cursor, status=status)
    if as_json:
        emit_json({"items": [qna_to_dict(q) for q in page.items], "next": page.next_cursor})
        return
    if not page.items:
        # On stderr: a person sees why nothing came, a script still reads no lines.
        if cursor is not None:
            tell(f"No more {status} questions." if status else "No more questions.")
        else:  # other records may be there: only of this status is there none "yet"
            tell(f"No {status} questions." if status else "No questions yet.")
    for qna in page.items:
        # Stored and shown in UTC; said so, or it reads as the local time.
        stamp = qna.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        say(f"{qna.id}  {stamp}  {qna.status.value:<8}  {_one_line(qna.question, 60)}")
        cached = "[cached] " if qna.source_id is not None else ""
        say(f"    {_one_line(cached + describe(qna), 100)}")
    if page.next_cursor:
        # The same page size as this one: following the hint should read on, not re-page.
        size = f"-n {limit} " if limit != ListQnA.DEFAULT_LIMIT else ""
        only = f"--status {status} " if status else ""
        say(f"(more: qna history {size}{only}--cursor {page.next_cursor})")


@cli.command()
@click.argument("qna_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the whole stored record as JSON.")
@pass_app
@handles_errors
def show(app: AppContext, qna_id: str, as_json: bool) -> None:
    """Show one stored question and its answer.

    ID is the record's id, or a start of it that no other record's id has (at
    least 4 characters, e.g. 3f0c2c4e).

    \b
    Exit codes: 0 shown, 3 configuration, 4 a start of an id too short or shared
    by several records, 5 no such record, 6 database unavailable.
    """
    FindQnA.parse(qna_id)  # wrong on its face: said so before the database is opened
    qna = app.container().find_qna()(qna_id)
    if as_json:
        emit_json(qna_to_dict(qna))
        return
    say(f"id:       {qna.id}")
    say(f"asked:    {qna.created_at.isoformat()}")
    say(f"status:   {qna.status.value}")
    say(f"model:    {qna.model}")
    if qna.latency_ms is not None:
        say(f"latency:  {qna.latency_ms} ms")
    counts = [(qna.prompt_tokens, "prompt"), (qna.completion_tokens, "completion")]
    if reported := [f"{count} {kind}" for count, kind in counts if count is not None]:
        say(f"tokens:   {', '.join(reported)}")
    if qna.finish_reason is not None:
        say(f"finish:   {qna.finish_reason}")
    if qna.source_id is not None:
        say(f"source:   the cache (the answer of {qna.source_id})")
    say(f"question: {_indented(qna.question)}")
    say(f"answer:   {_indented(describe(qna))}")


@cli.group()
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade")
@pass_app
@handles_errors
def db_upgrade(app: AppContext) -> None:
    """Apply every pending migration (also done automatically on start).

    \b
    Exit codes: 0 up to date, 3 configuration, 6 database unavailable
    (or holding a schema qna does not know: a newer qna's, another application's).
    """
    app.container()
    say("database is up to date")


def _listen_host(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    # gunicorn reads an empty host as every address: `--host "$HOST"` with HOST unset
    # would have opened the API to the network.
    if not value.strip():
        raise click.BadParameter("is empty; to listen on every address, say 0.0.0.0 or ::")
    # An IPv6 address written as in a URL, [::1], is the address inside the brackets.
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1]
    # A URL or host:port ([::1]:5000 too; an IPv6 address alone has two colons or
    # more): told as a usage error, not as an address that cannot be listened on.
    if "/" in value or value.count(":") == 1 or (value.startswith("[") and "]:" in value):
        raise click.BadParameter("is a host name or address alone; the port goes in --port")
    return value


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    callback=_listen_host,
    help="Address to listen on; 0.0.0.0 or :: for every address. On a loopback one, only "
    "this machine's names are answered (and QNA_ALLOWED_HOSTS').",
)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes (about one per CPU core).",
)
@click.option(
    "--worker-class",
    type=click.Choice(["gevent", "gthread"]),
    default="gevent",
    show_default=True,
    help="gunicorn worker kind: gevent (greenlets) or gthread (OS threads).",
)
@click.option(
    "--connections",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="gevent: client connections one worker holds at once (each ask in flight needs one).",
)
@click.option(
    "--threads",
    default=256,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="gthread: threads per worker, each holding one ask waiting on the LLM.",
)
@click.option(
    "--graceful-timeout",
    default=30,
    show_default=True,
    type=click.IntRange(0),
    help="On SIGTERM, seconds to let in-flight asks finish.",
)
@handles_errors
def serve(
    host: str,
    port: int,
    workers: int,
    worker_class: str,
    connections: int,
    threads: int,
    graceful_timeout: int,
) -> None:
    """Serve the HTTP API under gunicorn (migrates the database first).

    \b
    Exit codes: 0 stopped by SIGTERM (asks in flight may finish within
    --graceful-timeout; those still running then are cut off), 3 configuration,
    6 a database that waiting cannot mend (not a database, corrupt, a SQLite
    directory that cannot be made, a schema qna does not know or whose table is
    gone; one that is down is waited for), 12 cannot listen on --host
    and --port (in use, not this machine's address), 130 stopped by Ctrl-C and
    131 by SIGQUIT (at once: asks in flight are cut off).
    """
    from qna.entrypoints.http import server

    try:
        server.serve(
            host=host,
            port=port,
            workers=workers,
            worker_class=worker_class,
            connections=connections,
            threads=threads,
            graceful_timeout=graceful_timeout,
        )
    except server.CannotListen as exc:
        fail(str(exc), EXIT_CANNOT_LISTEN)


def read_question(argument: str, *, max_length: int) -> str:
    """QUESTION, or all of stdin for `-`, as text in the locale's encoding.

    Bytes that are not text are an invalid question: read from stdin they were an
    internal error (or a "lone surrogate", depending on the locale), and Python hands
    over those of an argument as surrogates nobody typed.
    """
    if argument == "-":
        if sys.stdin is None:  # `<&-`
            raise InvalidQuestion("There is no standard input to read the question from.")
        encoding = sys.stdin.encoding
        if sys.stdin.isatty() and sys.stderr is not None and sys.stderr.isatty():
            # Typed at the terminal: without a word it looked as if qna had hung. Only
            # to a person's terminal, as the spinner: not into a log (`2>log`).
            tell("Type the question; end it with Ctrl-D on a line of its own.")
        # Room for the longest question (4 bytes a character at most) and blank lines
        # around it. Past that it is too long, whatever follows: reading on, `yes |
        # qna ask -` ran until memory did.
        room = 4 * max_length + STDIN_SLACK_BYTES
        raw = sys.stdin.buffer.read(room + 1)
        if len(raw) > room:
            raise InvalidQuestion(
                f"The question on standard input is longer than the limit of {max_length} "
                "characters."
            )
    else:
        encoding = sys.getfilesystemencoding()
        raw = os.fsencode(argument)  # the argument's bytes, as they were given
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        name = codecs.lookup(encoding).name.upper()
        raise InvalidQuestion(
            f"The question is not valid {name} text: byte {raw[exc.start]:#04x} "
            f"at offset {exc.start}."
        ) from None


def _indented(text: str) -> str:
    """`text`'s second line on, under the first (after a label such as "answer:   ")."""
    return text.replace("\n", "\n" + " " * 10)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


#: Set by `main`: the command runs as a process of its own, whose psycopg2 it may set
#: up (a wait callback is process-wide); not when `cli` is called inside another
#: program (a test's CliRunner).
_own_process = False


def main() -> None:
    # The text output is for a person: a character the output's encoding lacks is
    # shown as "?", instead of the stored question it is in ending the command.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    # Here, not in the command group: the tests run the commands inside pytest, whose
    # own SIGTERM must stay as it is. `qna serve`'s gunicorn sets its own handlers.
    signal.signal(signal.SIGTERM, _terminate)
    global _own_process
    _own_process = True
    try:
        sys.exit(_run_cli())
    finally:
        # The exit status is decided; all that is left is the interpreter's shutdown
        # (finalizers, atexit). A Ctrl-C or SIGTERM then printed a traceback from
        # there ("Exception ignored in ..."), the second of two signals most often.
        for number in _INTERRUPTS:
            signal.signal(number, signal.SIG_IGN)


def _run_cli() -> int:
    """The command's exit status. click's standalone mode is not used: a Ctrl-C or a
    SIGTERM outside a command's own error handling (as the command ends, or while
    click reads the arguments) came out as its "Aborted!", exit 1."""
    try:
        returned = cli.main(prog_name="qna", standalone_mode=False)
    except click.Abort as abort:
        terminated = isinstance(abort.__cause__, Terminated)
        tell(error_line("terminated" if terminated else "interrupted"))
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except click.ClickException as exc:  # a usage error: its own message and code
        exc.show()
        return exc.exit_code
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        # click's own output (`qna --help | head -1`) to a reader that went away.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    # `ctx.exit(code)` returns its code; a command that ends normally returns None.
    return returned if isinstance(returned, int) else 0
