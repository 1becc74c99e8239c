"""The rules about questions and the life of a QnA record."""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qna.domain import (
    DEFAULT_MAX_QUESTION_LENGTH,
    InvalidQuestion,
    LLMRateLimited,
    LLMTimeout,
    QnA,
    Status,
    parse_question,
)
from qna.domain.model import Abandonment, normalise_for_cache

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=3)

# Characters `str.strip()` removes, beyond the ASCII space: what a pasted question brings.
UNICODE_SPACES = [
    "\u00a0",  # no-break space
    "\u1680",  # ogham space mark
    "\u2002",  # en space
    "\u2003",  # em space
    "\u2009",  # thin space
    "\u200a",  # hair space
    "\u2028",  # line separator
    "\u2029",  # paragraph separator
    "\u202f",  # narrow no-break space
    "\u205f",  # medium mathematical space
    "\u3000",  # ideographic space
    "\x85",  # next line (C1)
]
WHITESPACE = [" ", "\t", "\n", "\r", "\x0b", "\x0c", *UNICODE_SPACES]

REFUSED_CONTROLS = [
    # CR is not here: parse_question turns CRLF and lone CR into LF.
    *(chr(code) for code in range(0x00, 0x20) if chr(code) not in "\n\t\r"),
    "\x7f",
    *(chr(code) for code in range(0x80, 0xA0)),
]


def _is_acceptable_char(char: str) -> bool:
    return char in "\n\t" or unicodedata.category(char) not in ("Cc", "Cs")


def _is_visible_char(char: str) -> bool:
    return not char.isspace() and unicodedata.category(char) not in ("Cf", "Zs", "Zl", "Zp")


# --- parse_question ------------------------------------------------------------------


def test_surrounding_whitespace_is_stripped() -> None:
    assert parse_question("  \n\tWhat is a monad?\u3000\n ") == "What is a monad?"


def test_a_byte_order_mark_around_the_question_is_stripped() -> None:
    # A file saved by a Windows editor and piped in: `qna ask - < question.txt`.
    assert parse_question("\ufeffWhat is BOM?\r\n") == "What is BOM?"
    assert parse_question("\ufeff \ufeffWhy?\ufeff") == "Why?"
    assert parse_question("Keep\ufeffinside") == "Keep\ufeffinside"


@pytest.mark.parametrize("text", ["", " ", "   ", "\n\t\r\n", " \x0b\x0c "])
def test_empty_or_blank_question_is_refused(text: str) -> None:
    with pytest.raises(InvalidQuestion, match="empty"):
        parse_question(text)


@pytest.mark.parametrize("space", UNICODE_SPACES, ids=lambda c: f"U+{ord(c):04X}")
def test_question_of_unicode_spaces_only_is_refused(space: str) -> None:
    with pytest.raises(InvalidQuestion, match="empty"):
        parse_question(space * 3)


def test_question_mixing_every_kind_of_space_is_refused() -> None:
    with pytest.raises(InvalidQuestion, match="empty"):
        parse_question("".join(WHITESPACE))


def test_question_of_exactly_the_maximum_length_is_accepted() -> None:
    text = "a" * DEFAULT_MAX_QUESTION_LENGTH

    assert parse_question(text) == text


def test_question_one_over_the_maximum_length_is_refused() -> None:
    with pytest.raises(InvalidQuestion, match=str(DEFAULT_MAX_QUESTION_LENGTH)):
        parse_question("a" * (DEFAULT_MAX_QUESTION_LENGTH + 1))


def test_length_is_measured_after_stripping() -> None:
    core = "b" * DEFAULT_MAX_QUESTION_LENGTH

    assert parse_question(f"   {core}\n\n") == core


def test_length_is_counted_in_characters_not_bytes() -> None:
    text = "é" * 5  # 10 bytes in UTF-8

    assert parse_question(text, max_length=5) == text


def test_a_custom_maximum_length_is_honoured() -> None:
    assert parse_question("12345", max_length=5) == "12345"
    with pytest.raises(InvalidQuestion, match="6 characters long; the limit is 5"):
        parse_question("123456", max_length=5)


def test_nul_is_refused_and_its_position_reported() -> None:
    with pytest.raises(InvalidQuestion, match=r"U\+0000\) at position 4"):
        parse_question("What\x00 is it?")


@pytest.mark.parametrize("control", REFUSED_CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_control_characters_other_than_newline_and_tab_are_refused(control: str) -> None:
    with pytest.raises(InvalidQuestion, match=f"U\\+{ord(control):04X}"):
        parse_question(f"before{control}after")


def test_newline_and_tab_inside_the_question_are_kept() -> None:
    text = "Compare:\n\ta = 1\n\tb = 2\nWhich is larger?"

    assert parse_question(text) == text


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidQuestion, match="surrogate"):
        parse_question("half a pair: \ud83d!")


def test_a_non_string_is_refused() -> None:
    with pytest.raises(InvalidQuestion, match="string"):
        parse_question(b"bytes are not text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "Is 🤖 the right emoji for 👩‍👩‍👧‍👦?",  # ZWJ sequence
        "ما هو معنى الحياة؟",  # right-to-left script
        "abc \u202edcba\u202c and \u200fmark",  # RTL override and mark (format chars)
        "cafe\u0301 vs caf\u00e9",  # decomposed and precomposed: not normalised
        "Z\u0351\u0352\u0357a\u035b\u0346l\u0300\u0301g\u0302o",  # stacked combining marks
        "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594 in the astral plane",
    ],
)
def test_unusual_but_legitimate_text_is_kept_byte_for_byte(text: str) -> None:
    parsed = parse_question(text)

    assert parsed.encode("utf-8") == text.encode("utf-8")


@pytest.mark.parametrize(
    "text",
    [
        "'; DROP TABLE qna; --",
        "Robert'); DELETE FROM qna WHERE '1'='1",
        'SELECT * FROM "qna" WHERE id = $1 OR 1=1 /* %s %(x)s */',
    ],
)
def test_sql_looking_text_is_kept_verbatim(text: str) -> None:
    assert parse_question(text) == text


@given(
    left=st.text(alphabet=st.sampled_from(WHITESPACE), max_size=5),
    core=st.text(min_size=1, max_size=60),
    right=st.text(alphabet=st.sampled_from(WHITESPACE), max_size=5),
    max_length=st.integers(min_value=1, max_value=80),
)
def test_accepted_text_is_the_input_with_lf_line_ends_stripped_and_otherwise_unchanged(
    left: str, core: str, right: str, max_length: int
) -> None:
    text = left + core + right
    stripped = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    while stripped[:1] == "\ufeff" or stripped[-1:] == "\ufeff":
        stripped = stripped.strip("\ufeff").strip()
    should_accept = (
        0 < len(stripped) <= max_length
        and all(_is_acceptable_char(c) for c in stripped)
        and any(_is_visible_char(c) for c in stripped)
    )

    try:
        parsed = parse_question(text, max_length=max_length)
    except InvalidQuestion:
        assert not should_accept
    else:
        assert should_accept
        assert parsed == stripped


@given(
    prefix=st.text(max_size=50),
    control=st.sampled_from(REFUSED_CONTROLS),
    suffix=st.text(max_size=50),
)
def test_any_text_with_an_inner_control_character_is_refused(
    prefix: str, control: str, suffix: str
) -> None:
    # The letters around it keep the control character inside, where strip() can't reach.
    with pytest.raises(InvalidQuestion):
        parse_question(f"x{prefix}{control}{suffix}x")


# --- normalise_for_cache -------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("What is the answer?", "  what IS   the\tanswer?\n"),
        ("straße", "STRASSE"),  # casefold, not lower
        ("a\u3000b", "a b"),
        # One text, composed (as typed on Windows or Linux) and decomposed (macOS).
        ("Qu\u00e9 es un caf\u00e9?", "Que\u0301 es un cafe\u0301?"),
        ("\u1e9e", "SS"),  # capital sharp s, composed or not, folds to ss
        ("\u212b", "\u00e5"),  # the angstrom sign is canonically a with ring above
    ],
)
def test_normalise_ignores_case_and_spacing(left: str, right: str) -> None:
    assert normalise_for_cache(left) == normalise_for_cache(right)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("What is the answer?", "What is the answer"),  # punctuation counts
        ("ab", "a b"),  # a space between words counts
        ("café", "cafe"),  # accents count
    ],
)
def test_normalise_keeps_everything_but_case_and_spacing(left: str, right: str) -> None:
    assert normalise_for_cache(left) != normalise_for_cache(right)


def test_normalise_result_is_single_spaced_lower_case() -> None:
    assert normalise_for_cache("\n  Hello \t\t WORLD  \n") == "hello world"


@given(st.text())
def test_text_typed_in_nfc_keeps_the_key_it_had_before_unicode_forms_counted(
    text: str,
) -> None:
    # Keys stored before are casefold-and-split of the text; the cache finds those
    # answers still, for the text nearly everyone sends.
    text = unicodedata.normalize("NFC", text)
    before = " ".join(text.casefold().split())
    if unicodedata.is_normalized("NFC", before):
        assert normalise_for_cache(text) == before


WORD = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation, min_size=1)


@given(
    words=st.lists(WORD, min_size=1, max_size=8),
    separators=st.lists(
        st.text(alphabet=st.sampled_from(WHITESPACE), min_size=1, max_size=3),
        min_size=9,
        max_size=9,
    ),
    padding=st.text(alphabet=st.sampled_from(WHITESPACE), max_size=3),
)
def test_normalise_is_blind_to_case_and_whitespace_runs(
    words: list[str], separators: list[str], padding: str
) -> None:
    spaced = padding + "".join(w.swapcase() + s for w, s in zip(words, separators, strict=False))

    assert normalise_for_cache(spaced) == " ".join(words).casefold()


# --- QnA state transitions -----------------------------------------------------------


def _pending() -> QnA:
    return QnA.ask("What is 6 x 7?", model="gpt-test", now=NOW)


def _answer(qna: QnA) -> None:
    qna.record_answer(
        answer="42",
        model="gpt-test-2025-01-01",
        prompt_tokens=12,
        completion_tokens=2,
        latency_ms=850,
        now=LATER,
        finish_reason="stop",
    )


def _fail(qna: QnA) -> None:
    qna.record_failure(LLMTimeout("took too long"), latency_ms=30_000, now=LATER)


def _cache(qna: QnA) -> None:
    source = _pending()
    _answer(source)
    qna.record_cached(source, now=LATER)


def _abandon(qna: QnA) -> None:
    qna.abandon(now=LATER)


TRANSITIONS: dict[str, Callable[[QnA], None]] = {
    "answer": _answer,
    "failure": _fail,
    "cached": _cache,
    "abandon": _abandon,
}


def test_a_new_question_is_pending_with_nothing_recorded() -> None:
    qna = _pending()

    assert qna.status is Status.PENDING
    assert (qna.question, qna.model, qna.created_at) == ("What is 6 x 7?", "gpt-test", NOW)
    assert qna.answer is None
    assert qna.answered_at is None
    assert qna.source_id is None


def test_each_new_question_gets_its_own_id() -> None:
    assert _pending().id != _pending().id


def test_record_answer() -> None:
    qna = _pending()

    _answer(qna)

    assert qna.status is Status.ANSWERED
    assert qna.answer == "42"
    assert qna.response_model == "gpt-test-2025-01-01"
    assert qna.model == "gpt-test"  # the model asked for stays, for the cache
    assert (qna.prompt_tokens, qna.completion_tokens, qna.latency_ms) == (12, 2, 850)
    assert qna.finish_reason == "stop"
    assert not qna.is_cut_off
    assert qna.answered_at == LATER
    assert qna.error_kind is None
    assert qna.error_message is None
    assert qna.source_id is None


def test_record_failure_keeps_the_error_code_and_message() -> None:
    qna = _pending()

    qna.record_failure(LLMRateLimited("slow down", retry_after=2.0), latency_ms=120, now=LATER)

    assert qna.status is Status.FAILED
    assert qna.error_kind == "llm_rate_limited"
    assert qna.error_message == "slow down"
    assert qna.latency_ms == 120
    assert qna.answered_at == LATER
    assert qna.answer is None


def test_record_cached_copies_the_answer_and_points_at_its_source() -> None:
    source = _pending()
    _answer(source)
    asked_at = LATER + timedelta(hours=1)
    qna = QnA.ask("what is 6 X 7?", model="gpt-test", now=asked_at)

    qna.record_cached(source, now=asked_at)

    assert qna.status is Status.ANSWERED
    assert qna.answer == source.answer
    assert qna.model == source.model
    # The model that answered (a dated version of the one asked for) is the source's;
    # the time it was answered is this ask's, not the source's.
    assert qna.response_model == source.response_model == "gpt-test-2025-01-01"
    assert (qna.created_at, qna.answered_at) == (asked_at, asked_at)
    assert qna.source_id == source.id
    assert (qna.prompt_tokens, qna.completion_tokens, qna.latency_ms) == (0, 0, 0)
    assert qna.finish_reason == source.finish_reason == "stop"
    assert qna.question == "what is 6 X 7?"
    assert source.status is Status.ANSWERED  # the source is only read


@pytest.mark.parametrize(
    ("reason", "cut_off"),
    [
        ("length", True),
        ("content_filter", True),
        ("stop", False),
        ("tool_calls", False),
        (None, False),
    ],
)
def test_an_answer_is_cut_off_when_the_llm_stopped_short(reason: str | None, cut_off: bool) -> None:
    qna = _pending()
    assert not qna.is_cut_off

    qna.record_answer(
        answer="The first three primes are 2, 3 and",
        model="gpt-test",
        prompt_tokens=5,
        completion_tokens=8,
        latency_ms=10,
        now=LATER,
        finish_reason=reason,
    )

    assert qna.is_cut_off is cut_off


def test_a_failure_is_never_cut_off() -> None:
    qna = _pending()
    qna.finish_reason = "length"  # as no transition sets it: only the status decides
    _fail(qna)

    assert not qna.is_cut_off


def test_a_pending_record_is_abandoned_past_its_own_deadline_when_it_has_one() -> None:
    own = QnA.ask("Q?", model="m", now=NOW, abandon_after=timedelta(minutes=3))
    older = QnA.ask("Q?", model="m", now=NOW)  # stored before records kept a deadline

    def abandoned(record: QnA, *, at: timedelta, reader_allows: timedelta) -> bool:
        return record.is_abandoned(Abandonment(NOW + at, reader_allows))

    # Its own 3 minutes, whatever the reader would allow.
    assert not abandoned(own, at=timedelta(minutes=3), reader_allows=timedelta(seconds=1))
    assert abandoned(own, at=timedelta(minutes=3, seconds=1), reader_allows=timedelta(hours=1))
    # The reader's allowance for a record that does not say.
    assert not abandoned(older, at=timedelta(minutes=5), reader_allows=timedelta(minutes=5))
    assert abandoned(older, at=timedelta(minutes=5, seconds=1), reader_allows=timedelta(minutes=5))
    # Never once it has an outcome.
    _answer(own)
    assert not abandoned(own, at=timedelta(days=1), reader_allows=timedelta(0))


def test_abandon_marks_the_record_failed() -> None:
    qna = _pending()

    qna.abandon(now=LATER)

    assert qna.status is Status.FAILED
    assert qna.error_kind == "abandoned"
    assert qna.error_message
    assert qna.answered_at == LATER
    assert qna.answer is None


@pytest.mark.parametrize("second", TRANSITIONS)
@pytest.mark.parametrize("first", TRANSITIONS)
def test_a_closed_record_refuses_a_second_transition(first: str, second: str) -> None:
    qna = _pending()
    TRANSITIONS[first](qna)
    before = (qna.status, qna.answer, qna.error_kind, qna.model, qna.source_id, qna.latency_ms)

    with pytest.raises(ValueError, match="already"):
        TRANSITIONS[second](qna)

    after = (qna.status, qna.answer, qna.error_kind, qna.model, qna.source_id, qna.latency_ms)
    assert after == before


@pytest.mark.parametrize("text", ["a\r\nb", "a\rb", "a\nb"])
def test_line_ends_are_stored_as_lf(text: str) -> None:
    assert parse_question(text) == "a\nb"


@pytest.mark.parametrize("text", ["\u200b", "\ufeff\u200b", " \u200d "])
def test_only_invisible_characters_is_an_empty_question(text: str) -> None:
    with pytest.raises(InvalidQuestion, match="empty"):
        parse_question(text)
