"""The `code` each HTTP status has in an error body, whoever answers it.

Two answer errors: the Flask app (`errors.py`) and gunicorn itself, for requests it
cannot parse (`server.py`, which is loaded in the gunicorn master before the metrics
directory is set, so it may not import Flask or prometheus_client). Hence a module of
its own that imports nothing: one table, one code per status.
"""

from __future__ import annotations

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    422: "unprocessable_entity",
    429: "rate_limited",
    431: "headers_too_large",
}


def code_for(status: int) -> str:
    """The code of a status no handler named more precisely."""
    return HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")
