"""The OpenAPI 3.1 document, built from the pydantic models that validate and shape the
bodies, so the contract and the code cannot drift apart."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from qna.application.use_cases import IDEMPOTENCY_KEY_PATTERN, ListQnA
from qna.domain.model import Status
from qna.entrypoints.presenters import AskRequest, ErrorResponse, Health, QnAOut, QnAPage

REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(model)}},
        **extra,
    }


# An LLM failure the database would not store either: answered as the LLM's error.
FAILURE_NOT_STORED = (
    "If the database would not store the failure either, the error has no qna_id, its "
    'message says so, and the failed record is beside it, as "record".'
)

# What each error status means, and the `code`s it carries. A route whose errors of
# one status differ from these (GET /questions's 400s are about its parameters, not a
# question) passes its own text.
ERROR_TEXTS = {
    400: "The request is malformed: not JSON or not UTF-8 (`invalid_json`), the wrong "
    "fields or types, or a key given twice in one object (`invalid_request`), a question "
    "that is empty, too long or contains control characters (`invalid_question`), an "
    "Idempotency-Key that is not one key of 1 to 200 visible ASCII characters (no spaces, "
    "no commas) (`invalid_argument`), or a malformed chunked body, one cut short of its "
    "Content-Length or one in a Transfer-Encoding other than chunked (`bad_request`).",
    401: "A bearer token is required (QNA_API_TOKENS is set) and was missing or wrong "
    "(`unauthorized`).",
    404: "No such record, or the id is not one (`not_found`).",
    409: "A request with this Idempotency-Key is still being answered "
    "(`idempotency_key_in_flight`).",
    408: "The body did not arrive in time (`request_timeout`): within QNA_BODY_TIMEOUT_S "
    "in all (gevent workers, the default) or at each wait for more of it (gthread "
    "workers); the connection is closed.",
    413: "The body is larger than QNA_MAX_BODY_BYTES (`payload_too_large`).",
    415: "The body is not JSON (application/json or a +json type), is declared in a "
    "charset other than UTF-8, or is compressed (a Content-Encoding other than identity) "
    "(`unsupported_media_type`).",
    422: "This Idempotency-Key was used with a different body (`idempotency_key_reused`).",
    421: "The request's Host names neither this machine's loopback nor a name in "
    "QNA_ALLOWED_HOSTS (`unknown_host`): a server on the loopback address answers only to "
    "its own names, against DNS rebinding.",
    429: "Too many requests; see Retry-After (`rate_limited`).",
    500: "An unexpected error (`internal_error`).",
    502: "The LLM refused the request (`llm_refused`) or gave an unusable answer "
    "(`llm_bad_response`); stored as failed, the error's qna_id names the record. "
    + FAILURE_NOT_STORED,
    503: "The LLM is unavailable (`llm_unavailable`) or rate-limited us "
    "(`llm_rate_limited`), or the database is unavailable (`database_unavailable`); "
    "see Retry-After, absent when waiting cannot help (a SQLite file that is not a "
    "database, a schema qna does not know). When the LLM answered but the database "
    "would not store the answer, the 503 `database_unavailable` carries the answered "
    'record beside the error, as "record" (the stored one stays pending until it is '
    "closed as abandoned). " + FAILURE_NOT_STORED + " An application embedded without "
    "OPENAI_API_KEY or OPENAI_BASE_URL answers `misconfigured` (`qna serve` refuses to "
    "start without them), as does one whose database refuses the login of DATABASE_URL "
    "(a wrong user name, password or database name, no right to connect to it; `qna serve` "
    "refuses to start then "
    "too).",
    504: "The LLM did not answer in time (`llm_timeout`); stored as failed, the error's qna_id "
    "names the record. " + FAILURE_NOT_STORED,
}
DATABASE_UNAVAILABLE = (
    "The database is unavailable (`database_unavailable`); see Retry-After, absent when "
    "waiting cannot help (a SQLite file that is not a database, a schema qna does not "
    "know). `misconfigured` when the database refuses the login of DATABASE_URL "
    "(a wrong user name, password or database name, no right to connect to it)."
)


def _errors(*statuses: int, texts: dict[int, str] | None = None) -> dict[str, Any]:
    texts = {**ERROR_TEXTS, **(texts or {})}
    headers = {
        401: {
            "WWW-Authenticate": {
                "description": 'Bearer realm="qna"; with error="invalid_token" when a bearer '
                "token was sent but is not one of QNA_API_TOKENS.",
                "schema": {"type": "string"},
            }
        },
        409: {
            "Retry-After": {
                "description": "Seconds until the first request's LLM deadline leaves only "
                "the wait a retry spends on the server (at least 1).",
                "schema": {"type": "string"},
            }
        },
        429: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
        503: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
    }
    return {
        str(status): _json(ErrorResponse, texts[status], **_with_headers(headers.get(status)))
        for status in statuses
    }


def _with_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {"headers": headers} if headers else {}


REQUEST_ID = {
    "X-Request-ID": {
        "description": "The client's X-Request-ID if it sent a sane one, else a new one.",
        "required": True,
        "schema": {"type": "string"},
    }
}


# Not required: a rate-limit store that is down lets requests through without them.
RATE_LIMIT = {
    "X-RateLimit-Limit": {
        "description": "Requests the client may make in the current window (QNA_RATE_LIMIT).",
        "schema": {"type": "string"},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in the current window.",
        "schema": {"type": "string"},
    },
    "X-RateLimit-Reset": {
        "description": "When the current window ends, in seconds since the Unix epoch.",
        "schema": {"type": "string"},
    },
}
# Not counted against the rate limit: the probes, and OPTIONS (security.py).
_UNLIMITED_OPERATIONS = frozenset({"health", "ready"})


def _add_common_headers(paths: dict[str, Any], *, rate_limited: bool) -> None:
    """X-Request-ID on every response; the rate limit's headers on every response of
    an operation it counts."""
    for operations in paths.values():
        for operation in operations.values():
            counted = rate_limited and not (
                operation["operationId"] in _UNLIMITED_OPERATIONS
                or operation["operationId"].endswith("Options")
            )
            for response in operation["responses"].values():
                headers = response.setdefault("headers", {})
                headers.update(REQUEST_ID)
                if counted:
                    headers.update(RATE_LIMIT)


def _options(operations: dict[str, Any]) -> dict[str, Any]:
    """OPTIONS, which every route answers from its methods alone: without a token (a
    browser's CORS preflight carries none) and without spending the rate budget."""
    methods = [method.upper() for method in operations]
    if "GET" in methods:
        methods.append("HEAD")
    allow = ", ".join([*methods, "OPTIONS"])
    [operation] = operations.values()
    # A path's template parameters must be declared by each of its operations.
    in_path = [p for p in operation.get("parameters", []) if p["in"] == "path"]
    return {
        "operationId": f"{operation['operationId']}Options",
        "summary": "The methods this path accepts.",
        "security": [],
        **({"parameters": in_path} if in_path else {}),
        "responses": {
            "204": {
                "description": f"No body; Allow lists the methods ({allow}).",
                "headers": {
                    "Allow": {
                        "description": "The methods this path accepts.",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                },
            }
        },
    }


def openapi_document(
    *,
    max_question_length: int,
    max_body_bytes: int,
    auth: bool,
    rate_limited: bool = False,
    host_checked: bool = False,
) -> dict[str, Any]:
    _, top = models_json_schema(
        [
            (AskRequest, "validation"),
            (QnAOut, "serialization"),
            (QnAPage, "serialization"),
            (ErrorResponse, "serialization"),
            (Health, "serialization"),
        ],
        ref_template=REF,
    )
    schemas = top["$defs"]
    # The limit applies after stripping surrounding whitespace, so it is stated in
    # words rather than as a maxLength the raw string would be held to.
    schemas["AskRequest"]["properties"]["question"]["description"] += (
        f" This server's limit: {max_question_length} characters."
    )
    common = _errors(500)
    secured: list[dict[str, list[str]]] = [{"bearer": []}] if auth else []
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "qna",
            "version": "1",
            "description": "Ask an LLM a question; every question, answer and failure is kept. "
            f"Bodies are JSON (at most {max_body_bytes} bytes); every error is "
            '`{"error": {"code": ..., "message": ...}}`. Every GET operation also '
            "answers HEAD, with the status and headers GET would send and no body.",
        },
        "paths": {
            "/ask": {
                "post": {
                    "operationId": "ask",
                    "summary": "Ask a question; the answer is stored and returned.",
                    "security": secured,
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "Retrying with the same key and body returns the "
                            "same record without asking the LLM again.",
                            "schema": {
                                "type": "string",
                                "pattern": f"^{IDEMPOTENCY_KEY_PATTERN}$",
                            },
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(AskRequest)}},
                    },
                    "responses": {
                        "201": _json(
                            QnAOut,
                            "Answered and stored (also when served from the cache).",
                            headers={
                                "Location": {
                                    "description": "The stored record, relative to this "
                                    "request's URL: questions/<id>.",
                                    "schema": {"type": "string"},
                                },
                            },
                        ),
                        **_errors(400, 401, 408, 409, 413, 415, 422, 429, 502, 503, 504),
                        **common,
                    },
                }
            },
            "/questions": {
                "get": {
                    "operationId": "listQuestions",
                    "summary": "The history, newest first, a page at a time.",
                    "security": secured,
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": ListQnA.MAX_LIMIT,
                                "default": ListQnA.DEFAULT_LIMIT,
                            },
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "required": False,
                            "description": "The `next` value of the previous page.",
                            "schema": {"type": "string", "minLength": 1},
                        },
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "description": "Only the records in this state. An ask whose "
                            "process died mid-ask is `failed` (error kind `abandoned`), "
                            "not `pending`.",
                            "schema": {"type": "string", "enum": [s.value for s in Status]},
                        },
                    ],
                    "responses": {
                        "200": _json(QnAPage, "A page of records."),
                        **_errors(
                            400,
                            401,
                            429,
                            503,
                            texts={
                                400: "limit is not an integer from 1 to "
                                f"{ListQnA.MAX_LIMIT}, status is not one of its values, "
                                "or limit, cursor or status is given twice "
                                "(`invalid_argument`), or cursor is not the next of a "
                                "page (`invalid_cursor`).",
                                503: DATABASE_UNAVAILABLE,
                            },
                        ),
                        **common,
                    },
                }
            },
            "/questions/{id}": {
                "get": {
                    "operationId": "getQuestion",
                    "summary": "One stored record.",
                    "security": secured,
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": _json(QnAOut, "The record."),
                        **_errors(401, 404, 429, 503, texts={503: DATABASE_UNAVAILABLE}),
                        **common,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: the process answers. No I/O.",
                    "security": [],
                    "responses": {"200": _json(Health, "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: the database answers and is fully migrated.",
                    "security": [],
                    "responses": {
                        "200": _json(Health, "Ready."),
                        "503": _json(
                            ErrorResponse,
                            "Not ready: the database is unavailable (`database_unavailable`; "
                            "see Retry-After, absent when waiting cannot help), not at the "
                            "newest migration (`migrations_pending`), or refuses the login "
                            "of DATABASE_URL (`misconfigured`).",
                            headers={
                                "Retry-After": {
                                    "description": "Seconds to wait.",
                                    "schema": {"type": "string"},
                                }
                            },
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics.",
                    "security": secured,
                    "responses": {
                        "200": {
                            "description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 429),
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
    for operations in document["paths"].values():
        operations["options"] = _options(operations)
        # What this server cannot answer: 401 without tokens, 429 without a rate limit.
        unsent = {"401"} if not auth else set()
        unsent |= {"429"} if not rate_limited else set()
        for operation in operations.values():
            for status in unsent:
                operation["responses"].pop(status, None)
            if host_checked:  # before anything else, on every route and method
                operation["responses"].update(_errors(421))
    _add_common_headers(document["paths"], rate_limited=rate_limited)
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
