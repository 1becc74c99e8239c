"""The LLM port over the official `openai` SDK: chat completions from OpenAI or from any
OpenAI-compatible server (vLLM, Ollama, LM Studio...).

This is the only module that knows the SDK exists: its exceptions become the domain's
`LLMError`s here, and its retries are replaced by ours, which keep to one deadline.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai
from openai.types.chat import ChatCompletion

from qna.application.ports import Completion
from qna.domain.errors import (
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
)

# Servers such as Ollama or vLLM want no key, but the SDK refuses to start without one.
_PLACEHOLDER_API_KEY = "unused"
# As many connections as asks in flight, all kept for reuse.
_POOL_LIMITS = httpx2.Limits(max_connections=None, max_keepalive_connections=2048)
# Provider messages can carry whole request echoes; an error message needs the gist.
_DETAIL_LIMIT = 300


@dataclass(frozen=True)
class _Failure:
    """One failed attempt, classified; it becomes a domain error once we stop trying."""

    error: type[LLMError]
    #: Completes "The LLM at <url> ...", e.g. "could not be reached".
    what: str
    retryable: bool
    cause: BaseException
    #: The provider's own words, already redacted and truncated.
    detail: str = ""
    #: Seconds the provider asked us to wait (Retry-After), when it said so.
    retry_after: float | None = None


class OpenAILLM:
    """Answers questions with one chat completion, retrying what is worth retrying.

    One ask makes at most `max_attempts` requests, each limited to `request_timeout`
    seconds and all of them, waits included, to `deadline` seconds. It keeps no state
    between calls, so one instance serves many threads (the SDK client it holds is
    thread-safe and pools connections).
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
        sleep: Callable[[float], None] = time.sleep,
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
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._deadline = deadline
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._sleep = sleep
        self._clock = clock
        # One client for the adapter's life: it holds the HTTP connection pool, so asks
        # reuse warm connections. max_retries=0 because `complete` retries on its own,
        # within its deadline; with both, each of our attempts would hide up to
        # SDK-default retries and sleeps of its own, and the attempts would multiply.
        self._client = openai.OpenAI(
            api_key=api_key or _PLACEHOLDER_API_KEY,
            base_url=base_url,
            max_retries=0,
            timeout=openai.Timeout(request_timeout, connect=connect_timeout),
            # The SDK keeps 100 idle connections; with more asks than that in flight,
            # every extra ask would open and close a TCP (and TLS) connection.
            http_client=openai.DefaultHttpxClient(limits=_POOL_LIMITS),
        )
        self._where = _without_credentials(str(self._client.base_url).rstrip("/"))

    @property
    def model(self) -> str:
        return self._model

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def complete(self, question: str) -> Completion:
        give_up_at = self._clock() + self._deadline
        failure: _Failure | None = None
        attempts = 0
        out_of_time = False
        while attempts < self._max_attempts:
            remaining = give_up_at - self._clock()
            if remaining <= 0:
                out_of_time = True
                break
            attempt_timeout = min(self._request_timeout, remaining)
            attempts += 1
            try:
                response = self._client.chat.completions.create(
                    model=self._model,
                    messages=[{"role": "user", "content": question}],
                    timeout=openai.Timeout(
                        attempt_timeout, connect=min(self._connect_timeout, attempt_timeout)
                    ),
                )
            # APITimeoutError subclasses APIConnectionError, so it must come first.
            except openai.APITimeoutError as exc:
                what = f"did not answer within {attempt_timeout:.3g} s"
                failure = _Failure(LLMTimeout, what, retryable=True, cause=exc)
            except openai.APIConnectionError as exc:
                failure = _Failure(
                    LLMUnavailable, "could not be reached", retryable=True, cause=exc
                )
            except openai.APIStatusError as exc:
                failure = self._status_failure(exc)
            except (openai.OpenAIError, ValueError) as exc:
                # ValueError: a body sent as JSON that does not parse (json.JSONDecodeError
                # reaches us unwrapped); OpenAIError: a body that fails validation.
                failure = _Failure(
                    LLMBadResponse,
                    "answered with a body that is not a chat completion",
                    retryable=False,
                    cause=exc,
                    detail=type(exc).__name__,
                )
            else:
                return self._to_completion(response)

            if not failure.retryable or attempts == self._max_attempts:
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

    def _status_failure(self, exc: openai.APIStatusError) -> _Failure:
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers)
        detail = self._detail(exc.body)
        error: type[LLMError]
        if status == 429:
            error, what = LLMRateLimited, "rate-limited the request (HTTP 429)"
        elif status == 408:
            error, what = LLMTimeout, "timed the request out (HTTP 408)"
        elif status == 409 or status >= 500:
            # 409 is how OpenAI reports a lock held by a concurrent request: transient.
            error, what = LLMUnavailable, f"failed with HTTP {status}"
        else:
            # Any other 4xx (bad key, unknown model, bad request) would fail again.
            what = f"refused the request with HTTP {status}"
            return _Failure(LLMRefused, what, retryable=False, cause=exc, detail=detail)
        return _Failure(
            error, what, retryable=True, cause=exc, detail=detail, retry_after=retry_after
        )

    def _to_completion(self, response: object) -> Completion:
        # The SDK does not validate bodies: whatever JSON arrived is wrapped in (or instead
        # of) a ChatCompletion, so each part is checked before it is trusted.
        def bad(what: str) -> LLMBadResponse:
            return LLMBadResponse(self._redact(f"The LLM at {self._where} {what}."))

        if not isinstance(response, ChatCompletion):
            raise bad("answered with a body that is not a chat completion")
        choices = response.choices
        if not isinstance(choices, list) or not choices:
            raise bad("answered with no choices")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str) or not content.strip():
            refusal = getattr(message, "refusal", None)
            if isinstance(refusal, str) and refusal:
                raise bad(f"declined to answer: {_truncate(refusal)}")
            raise bad("answered with an empty message")
        usage = response.usage
        model = response.model
        return Completion(
            text=content,
            model=model if isinstance(model, str) and model else self._model,
            prompt_tokens=_count(getattr(usage, "prompt_tokens", None)),
            completion_tokens=_count(getattr(usage, "completion_tokens", None)),
        )

    def _error(self, failure: _Failure, attempts: int, out_of_time: bool) -> LLMError:
        message = f"The LLM at {self._where} {failure.what}"
        if attempts > 1:
            message += f" after {attempts} attempts"
        if out_of_time:
            message += f", with no time left within the {self._deadline:g} s deadline"
        if failure.detail:
            message += f": {failure.detail}"
        if not message.endswith((".", "!", "?", "…")):
            message += "."
        return failure.error(self._redact(message), retry_after=failure.retry_after)

    def _detail(self, body: object) -> str:
        # The SDK hands over the "error" member of OpenAI-style bodies, or the raw text.
        message = body.get("message") if isinstance(body, Mapping) else body
        if not isinstance(message, str):
            return ""
        return self._redact(_truncate(message))

    def _redact(self, text: str) -> str:
        # OpenAI echoes (part of) a rejected key in its 401 message; ours must not.
        return text.replace(self._api_key, "***") if self._api_key else text


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait as the response asks: `retry-after-ms` (OpenAI's, more precise),
    else `Retry-After` as seconds or as an HTTP date."""
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


def _truncate(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _without_credentials(url: str) -> str:
    # A base URL may embed user:password; error messages are shown and stored.
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))
