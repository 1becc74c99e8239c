"""What every LLM adapter of ours shares: one chat completion per ask, retried within
one deadline, with the provider's failures turned into the domain's `LLMError`s.

An adapter says how to make one attempt (`_attempt`); this module decides whether to
try again, how long to wait, and what to tell the person asking. Two adapters build on
it: `openai_llm.OpenAILLM` (the official SDK, the default) and `http_llm.HttpLLM` (one
pooled urllib3 request, a few times cheaper in CPU per ask).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from qna.application.ports import Completion
from qna.domain.errors import (
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
)
from qna.domain.model import MAX_FINISH_REASON_LENGTH, MAX_MODEL_LENGTH, MAX_TOKEN_COUNT

# Provider messages can carry whole request echoes; an error message needs the gist.
_DETAIL_LIMIT = 300
#: A key this long is starred wherever it appears, not only as a whole word.
_SECRET_LENGTH = 16

#: The most a chat completion's body may be. The longest answers models write (some
#: 100,000 tokens) come to well under a megabyte; a server that sends more (a broken
#: or hostile gateway's 100 MB, in a review) had it stored whole, and sent back with
#: every page of history that holds it.
MAX_REPLY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Failure:
    """One failed attempt, classified; it becomes a domain error once we stop trying."""

    error: type[LLMError]
    #: Completes "The LLM at <url> ...", e.g. "could not be reached".
    what: str
    retryable: bool
    cause: BaseException | None = None
    #: The provider's own words, already redacted and truncated.
    detail: str = ""
    #: Seconds the provider asked us to wait (Retry-After), when it said so.
    retry_after: float | None = None


@dataclass(frozen=True)
class Reply:
    """The parts of a chat completion qna keeps, as found in the body (unchecked)."""

    has_choices: bool
    content: object = None
    refusal: object = None
    model: object = None
    prompt_tokens: object = None
    completion_tokens: object = None
    finish_reason: object = None


class ChatCompletionsLLM(ABC):
    """Answers questions with one chat completion, retrying what is worth retrying.

    One ask makes at most `max_attempts` requests, each limited to `request_timeout`
    seconds and all of them, waits included, to `deadline` seconds. It keeps no state
    between calls, so one instance serves many threads.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        model: str,
        connect_timeout: float = 5.0,
        request_timeout: float = 60.0,
        deadline: float = 120.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not model:
            raise ValueError("A model name is needed.")
        if min(connect_timeout, request_timeout, deadline) <= 0:
            raise ValueError("Timeouts and the deadline must be positive.")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1.")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("Backoff delays cannot be negative.")
        if api_key is None and base_url is None:
            # The SDK would quietly read OPENAI_API_KEY; configuration is read in one
            # place only (the container), so a missing key is said here instead.
            raise ValueError("An API key is needed to use the OpenAI API.")
        self._model = model
        self._api_key = api_key or ""
        # A short key as a whole token only: a placeholder key such as "x" or "test"
        # (a local server needs none) would otherwise be starred out of every word
        # that holds it, and those words are stored ("mi***tral-8***7b"). A key long
        # enough to be a secret wherever it appears: a provider's echo of it next to
        # other letters ("Bearer%20sk-...", "sk-..._x") was stored as it was.
        escaped = re.escape(self._api_key)
        whole_token = rf"(?<![\w-]){escaped}(?![\w-])"
        self._key_in_text = (
            re.compile(escaped if len(self._api_key) >= _SECRET_LENGTH else whole_token)
            if api_key
            else None
        )
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._deadline = deadline
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        # Looked up at each call, not bound at import: under gevent workers the
        # cooperative time.sleep is patched in after this module was imported.
        self._sleep = sleep if sleep is not None else _sleep
        self._clock = clock
        self._where = ""

    @property
    def model(self) -> str:
        return self._model

    @abstractmethod
    def close(self) -> None:
        """Close the pooled connections."""

    @abstractmethod
    def _attempt(self, question: str, timeout: float, connect_timeout: float) -> Reply | Failure:
        """One request, limited to `timeout` seconds (and to `connect_timeout` to connect)."""

    def complete(self, question: str) -> Completion:
        give_up_at = self._clock() + self._deadline
        failure: Failure | None = None
        attempts = 0
        out_of_time = False
        while attempts < self._max_attempts:
            remaining = give_up_at - self._clock()
            if remaining <= 0:
                out_of_time = True
                break
            attempt_timeout = min(self._request_timeout, remaining)
            attempts += 1
            outcome = self._attempt(
                question, attempt_timeout, min(self._connect_timeout, attempt_timeout)
            )
            if isinstance(outcome, Reply):
                return self._to_completion(outcome)
            failure = outcome
            if not failure.retryable or attempts == self._max_attempts:
                # An attempt cut short by the deadline that timed out ran out of the
                # deadline, whichever count of attempts it was: the message says so,
                # not only the part of a timeout that was left for it.
                clipped = attempt_timeout < self._request_timeout
                out_of_time = clipped and issubclass(failure.error, LLMTimeout)
                break
            wait = failure.retry_after
            if wait is None:
                # Full jitter: many threads failing together must not retry together.
                cap = min(self._backoff_max, self._backoff_base * 2 ** (attempts - 1))
                wait = random.uniform(0, cap)
            if wait >= give_up_at - self._clock():
                # Sleeping would only end in a timeout; say what went wrong now instead.
                out_of_time = True
                break
            self._sleep(wait)

        if failure is None:  # only a clock that jumps ahead can leave no time for one attempt
            raise LLMTimeout(f"The LLM at {self._where} was not asked: no time was left.")
        raise self._error(failure, attempts, out_of_time) from failure.cause

    # -- for the adapters ------------------------------------------------------------------

    def _timed_out(
        self, timeout: float, connect_timeout: float, started: float, cause: BaseException
    ) -> Failure:
        """An attempt begun at `started` (time.monotonic) that ran out of time."""
        # Which limit ran out, the exception does not say reliably: urllib3 reports a
        # TLS handshake that never completes as a *read* timeout. The time waited does:
        # a read times out only after `timeout` s of silence, so an attempt that ended
        # sooner ran out of `connect_timeout` (connecting, TLS included). Real time,
        # not `self._clock`: it is the socket's waits that are measured.
        if connect_timeout < timeout and time.monotonic() - started < timeout:
            what = f"could not be connected to within {connect_timeout:.3g} s"
        else:
            what = f"did not answer within {timeout:.3g} s"
        return Failure(LLMTimeout, what, retryable=True, cause=cause)

    def _exchange_failed(self, cause: BaseException, what: str) -> Failure:
        """An exchange that failed short of a status; `what` says how
        (`broken_exchanges.what_failed`). Worth another try, whichever way it was."""
        return Failure(LLMUnavailable, what, retryable=True, cause=cause)

    def _status_failure(
        self,
        status: int,
        headers: Mapping[str, str],
        message: object,
        cause: BaseException | None = None,
    ) -> Failure:
        """A response that is not a 2xx; `message` is the provider's error message."""
        retry_after = retry_after_seconds(headers)
        detail = self._storable(_truncate(message)) if isinstance(message, str) else ""
        error: type[LLMError]
        if status == 429:
            error, what = LLMRateLimited, "rate-limited the request (HTTP 429)"
        elif status == 408:
            error, what = LLMTimeout, "timed the request out (HTTP 408)"
        elif status == 409 or status >= 500:
            # 409 is how OpenAI reports a lock held by a concurrent request: transient.
            error, what = LLMUnavailable, f"failed with HTTP {status}"
        else:
            # Any other status (bad key, unknown model, bad request) would fail again.
            what = f"refused the request with HTTP {status}"
            return Failure(LLMRefused, what, retryable=False, cause=cause, detail=detail)
        return Failure(
            error, what, retryable=True, cause=cause, detail=detail, retry_after=retry_after
        )

    def _request_body(self, question: str) -> dict[str, Any]:
        """The chat completion request for `question`, as both adapters send it."""
        return {"model": self._model, "messages": [{"role": "user", "content": question}]}

    def _read_reply(self, body: bytes) -> Reply | Failure:
        """A 2xx response's body: the chat completion in it, or why it is not one."""
        if len(body) > MAX_REPLY_BYTES:
            return Failure(
                LLMBadResponse,
                f"answered with {len(body):,} bytes, more than qna takes from an LLM "
                f"({MAX_REPLY_BYTES:,})",
                retryable=False,
            )
        try:
            parsed = json.loads(body)
        # Not JSON, not UTF-8, or nested deeper than the parser recurses ([[[[...]]]]).
        except (ValueError, RecursionError) as exc:
            return self._not_a_completion(exc)
        return _reply_from_json(parsed) or self._not_a_completion()

    def _not_a_completion(self, cause: BaseException | None = None) -> Failure:
        """A 2xx whose body is not a chat completion (`cause`: why it could not be read)."""
        detail = type(cause).__name__ if cause is not None else ""
        return Failure(
            LLMBadResponse,
            "answered with a body that is not a chat completion",
            retryable=False,
            cause=cause,
            detail=detail,
        )

    def _set_where(self, base_url: str) -> None:
        """The server named in error messages: the base URL, without credentials."""
        self._where = without_credentials(base_url).rstrip("/")

    # -- inside ------------------------------------------------------------------------------

    def _to_completion(self, reply: Reply) -> Completion:
        # Whatever JSON arrived is checked part by part before it is trusted.
        def bad(what: str) -> LLMBadResponse:
            return LLMBadResponse(self._storable(_sentence(f"The LLM at {self._where} {what}")))

        if not reply.has_choices:
            raise bad("answered with no choices")
        content = reply.content
        finish_reason = (
            self._storable(reply.finish_reason)[:MAX_FINISH_REASON_LENGTH]
            if isinstance(reply.finish_reason, str) and reply.finish_reason
            else None
        )
        if not isinstance(content, str) or not content.strip():
            refusal = reply.refusal
            if isinstance(refusal, str) and refusal:
                raise bad(f"declined to answer: {_truncate(refusal)}")
            # Why there is nothing, when it said: a reasoning model can spend its whole
            # token limit before it writes a word ("length").
            why = _EMPTY_BECAUSE.get(finish_reason or "", "")
            raise bad(f"answered with an empty message{why}")
        model = reply.model
        # Made storable, not refused: the answer has been paid for. A provider's
        # model name or token counts past what the columns hold are noise.
        return Completion(
            text=_storable_text(content),
            model=(
                self._storable(model)[:MAX_MODEL_LENGTH]
                if isinstance(model, str) and model
                else self._model
            ),
            prompt_tokens=_count(reply.prompt_tokens),
            completion_tokens=_count(reply.completion_tokens),
            finish_reason=finish_reason,
        )

    def _error(self, failure: Failure, attempts: int, out_of_time: bool) -> LLMError:
        message = f"The LLM at {self._where} {failure.what}"
        if attempts > 1:
            message += f" after {attempts} attempts"
        if out_of_time:
            message += f", with no time left within the {self._deadline:g} s deadline"
        if failure.detail:
            message += f": {failure.detail}"
        return failure.error(self._storable(_sentence(message)), retry_after=failure.retry_after)

    def _storable(self, text: str) -> str:
        """The provider's words as qna stores and shows them: without our API key
        (OpenAI echoes part of a rejected one in its 401 message) and without what no
        database stores (`_UNSTORABLE`)."""
        if self._key_in_text is not None:
            text = self._key_in_text.sub("***", text)
        return _storable_text(text)


# An empty answer's finish reason, said in words.
_EMPTY_BECAUSE = {
    "length": " (finish_reason length: its token limit ran out before it wrote any)",
    "content_filter": " (finish_reason content_filter: its content filter withheld it)",
}


# NUL, which PostgreSQL's text cannot hold (SQLite's can: both keep the same text so),
# and lone surrogates (a "\ud83d" escape in the JSON, an emoji cut in half at
# max_tokens), which neither database's driver can encode.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable_text(text: str) -> str:
    return _UNSTORABLE.sub("\ufffd", text)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait as the response asks: `retry-after-ms` (OpenAI's, more precise),
    else `Retry-After` as seconds or as an HTTP date. `headers` must match names
    case-insensitively, as both HTTP clients' header maps do."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return max(0.0, value)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT; parsedate says "-0000" as naive
            when = when.replace(tzinfo=UTC)
        value = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, value) if math.isfinite(value) else None


def _reply_from_json(body: object) -> Reply | None:
    """The parts of a chat completion body, or None when it is not a JSON object."""
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return Reply(has_choices=False)
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        message = {}
    usage = body.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    return Reply(
        has_choices=True,
        content=message.get("content"),
        refusal=message.get("refusal"),
        model=body.get("model"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        finish_reason=first.get("finish_reason") if isinstance(first, dict) else None,
    )


def error_message(body: object) -> object:
    """The message of an OpenAI-style error body (`{"error": {"message": ...}}`), of a
    bare `{"message": ...}`, or the body itself when it is text."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            return inner.get("message")
        return inner
    return body


def without_credentials(url: str) -> str:
    # A base URL may embed user:password, or a key in its query (?key=, ?api-key=);
    # error messages are shown and stored.
    parts = urlsplit(url)._replace(query="", fragment="")
    if parts.username is None and parts.password is None:
        return urlunsplit(parts)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


def _sentence(text: str) -> str:
    """`text` ending as a sentence: with a full stop, unless the provider's own words
    at its end already close it ("I can't help with that." gave "that..")."""
    return text if text.endswith((".", "!", "?", "…")) else text + "."


def _truncate(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None  # not a count, or not one we could store: unknown


def _sleep(seconds: float) -> None:
    time.sleep(seconds)
