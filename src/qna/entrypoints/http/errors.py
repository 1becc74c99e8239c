"""One error contract for every failure: JSON `{"error": {"code", "message"}}`, never HTML."""

from __future__ import annotations

import logging
import math

from flask import Flask, Response, jsonify
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import HTTPException

from qna.application.use_cases import InvalidArgument
from qna.config import ConfigurationError
from qna.domain.errors import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidQuestion,
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRefused,
    LLMTimeout,
    LLMUnavailable,
    NotFound,
    OutcomeNotStored,
    QnAError,
    StorageUnavailable,
)
from qna.domain.model import QnA
from qna.entrypoints.http import metrics
from qna.entrypoints.http.codes import code_for
from qna.entrypoints.presenters import ErrorInfo, qna_to_dict

log = logging.getLogger("qna.http")


class ApiError(Exception):
    """An error the HTTP layer itself raises (bad body, wrong media type, ...)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# Most specific first. 502: the LLM answered but unusably or refused us; 503: it (or
# the database) is not available now, try again; 504: it did not answer in time.
STATUS_BY_ERROR: list[tuple[type[QnAError], int]] = [
    (InvalidQuestion, 400),
    (InvalidArgument, 400),
    (NotFound, 404),
    (IdempotencyKeyInFlight, 409),
    (IdempotencyKeyReused, 422),
    (StorageUnavailable, 503),
    (LLMRateLimited, 503),
    (LLMUnavailable, 503),
    (LLMTimeout, 504),
    (LLMRefused, 502),
    (LLMBadResponse, 502),
    (LLMError, 502),
]


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    record: QnA | None = None,
    **extra: object,
) -> Response:
    error = ErrorInfo.model_validate({"code": code, "message": message, **extra})
    body: dict[str, object] = {"error": error.model_dump(mode="json", exclude_none=True)}
    if record is not None:
        # Dumped on its own: the error leaves out what it lacks, a record keeps its
        # nulls, as every other response that carries one does.
        body["record"] = qna_to_dict(record)
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def retry_after_header(seconds: float) -> str:
    """Retry-After in the whole seconds it counts, rounded up: a client sent back before
    the wait is over is refused again, and a 0 sends it back at once."""
    return str(max(1, math.ceil(seconds)))


def database_retry_after(error: StorageUnavailable) -> dict[str, str]:
    """The Retry-After of a 503 database_unavailable: only when waiting may help."""
    return {"Retry-After": "5"} if error.retryable else {}


def _count_database_error(error: StorageUnavailable) -> None:
    metrics.DATABASE_ERRORS.inc()
    log.warning("database unavailable", extra={"reason": error.message})


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> Response:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.errorhandler(QnAError)
    def domain_error(error: QnAError) -> Response:
        message = error.message
        # The outcome the database would not take reaches the asker all the same.
        record = error.qna if isinstance(error, OutcomeNotStored) else None
        if isinstance(error, OutcomeNotStored) and error.llm_error is not None:
            # The LLM failed, then storing that failed too: answered as the LLM's
            # failure (why there is no answer, what a client acts on, as `qna ask`
            # exits with its code), the database's failure said as well.
            _count_database_error(error)
            message = error.both_failures(error.llm_error)
            error = error.llm_error
        status = next(code for cls, code in STATUS_BY_ERROR if isinstance(error, cls))
        headers: dict[str, str] = {}
        extra: dict[str, object] = {}
        if isinstance(error, StorageUnavailable):
            _count_database_error(error)
            headers.update(database_retry_after(error))
        if isinstance(error, IdempotencyKeyInFlight) and error.retry_after is not None:
            headers["Retry-After"] = retry_after_header(error.retry_after)
        if isinstance(error, LLMError):
            metrics.record_failure(error.code)
            if error.qna_id is not None:
                extra["qna_id"] = error.qna_id
            if status == 503:
                headers["Retry-After"] = retry_after_header(error.retry_after or 1)
        return error_response(status, error.code, message, headers, record=record, **extra)

    @app.errorhandler(ConfigurationError)
    def configuration_error(error: ConfigurationError) -> Response:
        log.error("configuration error", extra={"reason": str(error)})
        return error_response(503, "misconfigured", str(error))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = code_for(status)
        message = _HTTP_MESSAGES.get(status) or error.description or code
        headers = {}
        if status == 405 and error.response is None:
            allowed = getattr(error, "valid_methods", None)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return error_response(status, code, message, headers)

    @app.errorhandler(ParseException)
    def malformed_body(error: ParseException) -> Response:
        # gunicorn parses a chunked body only as the view reads it; what it refuses
        # there (a chunk size that is not hex, a missing CRLF) is the client's mistake,
        # as the request lines and headers it refuses itself are.
        return error_response(400, "bad_request", f"The request body is malformed: {error}.")

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Something went wrong on our side.")


_HTTP_MESSAGES = {
    404: "There is nothing at this URL.",
    405: "This URL does not accept that method.",
    413: "The request body is too large.",
    429: "Too many requests; retry after the number of seconds in Retry-After.",
    431: "The request headers are too large.",
}
