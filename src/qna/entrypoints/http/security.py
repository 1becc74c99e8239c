"""Who may call the API, and how often: bearer tokens and per-client rate limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from qna.entrypoints.http.errors import ApiError, retry_after_header

# Open without a token: probes, and the description of the API itself.
PUBLIC_ENDPOINTS = frozenset(
    {
        "qna.healthz",
        "qna.readyz",
        "qna.docs",
        "qna.docs_with_a_slash",
        "qna.docs_asset",
        "qna.openapi_json",
    }
)
# Never rate-limited, the same ones: orchestrators poll the probes, and reading how to
# call the API (/docs fetches its files and /openapi.json on every load) must not use
# up the budget for calling it.
UNLIMITED_ENDPOINTS = PUBLIC_ENDPOINTS


def _is_options() -> bool:
    # OPTIONS is answered from the routes alone (the Allow header), and it is a
    # browser's CORS preflight, which never carries Authorization and precedes every
    # request it makes: it needs no token and spends no budget.
    return request.method == "OPTIONS"


def principal_of(token: str) -> str:
    """A stable, non-secret name for a token: for rate-limit buckets and key scopes."""
    return "t:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def install_access(app: Flask, tokens: list[str], limit: str, storage_uri: str) -> None:
    """Who may call the API, and how often, in this order: the request's bearer token
    is checked (a valid one names the rate-limit bucket), the rate limit counts the
    request, then a request without a valid token is refused (401).

    A request refused for its token is counted too, against its address: guessing
    tokens is as limited as calling, and a flood of them is a 429 like any other.
    Neither step touches the database, so 401 and 429 hold while it is down.
    """
    _install_identify(app, tokens)
    install_rate_limit(app, limit, storage_uri)

    @app.before_request
    def refuse_without_a_valid_token() -> None:
        refusal = g.pop("refusal", None)
        if refusal is not None:
            raise refusal


def _install_identify(app: Flask, tokens: list[str]) -> None:
    encoded = [token.encode() for token in tokens]

    @app.before_request
    def identify() -> None:
        g.principal = "anonymous"
        # A refusal the limiter's 429 kept from being raised must not outlive its
        # request (`g` is the app context's, which requests may share: the test client).
        g.pop("refusal", None)
        if not encoded or _routed_endpoint() in PUBLIC_ENDPOINTS or _is_options():
            return
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        candidate = presented.strip().encode()
        # Compare against every token, in constant time each, so neither the match nor
        # its position leaks through timing.
        matched = False
        for token in encoded:
            matched |= hmac.compare_digest(candidate, token)
        bearer = scheme.lower() == "bearer" and bool(candidate)
        if not bearer or not matched:
            g.refusal = ApiError(
                401,
                "unauthorized",
                "Send a valid token as 'Authorization: Bearer <token>'.",
                {"WWW-Authenticate": _challenge(token_sent=bearer)},
            )
            return
        g.principal = principal_of(candidate.decode(errors="replace"))


def _routed_endpoint() -> str | None:
    """The request's endpoint; for a method its route does not take (405, when Flask
    leaves the endpoint empty), the endpoint of that route: `POST /healthz` is a 405
    for anyone, as every public route's wrong method is, not a 401 without a token."""
    if request.endpoint is not None:
        return request.endpoint
    error = request.routing_exception
    if not isinstance(error, MethodNotAllowed):
        return None
    allowed = next(iter(error.valid_methods or ()), None)
    if allowed is None:
        return None
    adapter = current_app.url_map.bind_to_environ(request.environ)
    try:
        rule, _ = adapter.match(method=str(allowed), return_rule=True)
    except HTTPException:
        return None
    return str(rule.endpoint)


def _challenge(*, token_sent: bool) -> str:
    """RFC 6750, section 3.1: a bearer token that was sent and is not one of ours is
    `invalid_token` (get another one); a request without one (no Authorization, another
    scheme, an empty token) gets no error code, only the challenge."""
    return 'Bearer realm="qna", error="invalid_token"' if token_sent else 'Bearer realm="qna"'


def _client_key() -> str:
    principal = g.get("principal", "anonymous")
    return principal if principal != "anonymous" else "a:" + (get_remote_address() or "?")


# A Redis store that stops answering costs the request that finds it so this long, not
# the client's own default: 5 s since redis-py 8, no limit at all before. A URL's
# own `?socket_timeout=` and `?socket_connect_timeout=` win (redis-py reads them last).
STORE_TIMEOUT_S = 1.0
_REDIS_FAMILIES = frozenset({"redis", "rediss", "valkey", "valkeys"})


def _store_options(storage_uri: str) -> dict[str, Any]:
    family = urlsplit(storage_uri.strip()).scheme.lower().split("+")[0]
    if family not in _REDIS_FAMILIES:
        return {}
    return {"socket_connect_timeout": STORE_TIMEOUT_S, "socket_timeout": STORE_TIMEOUT_S}


def _not_a_breach(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("ratelimit ")


def install_rate_limit(app: Flask, limit: str, storage_uri: str) -> Limiter | None:
    if not limit.strip():
        return None

    # The limiter sets Retry-After on every response it counts, to the end of its
    # window (or later): that would tell clients of a successful request to wait, and
    # replace the wait a 503 calls for (the LLM provider's, or none when waiting cannot
    # help). So the Retry-After the response had before the limiter's hook is kept,
    # except on the limiter's own 429. Flask runs after_request hooks in reverse order
    # of registration: this one runs after the limiter's hook, `keep_own_retry_after`
    # (registered after the limiter) before it.
    @app.after_request
    def retry_after_of_the_limiter_only_on_429(response: Response) -> Response:
        if response.status_code != 429:
            response.headers.pop("Retry-After", None)
            own = g.pop("own_retry_after", None)
            if own is not None:
                response.headers["Retry-After"] = own
        elif (reset := response.headers.get("X-RateLimit-Reset", "")).isdigit():
            # The limiter's own Retry-After rounds the time to its reset down: in the
            # last second of a window it said 0, and a client honouring it was refused
            # again at once. Its reset time is rounded up; count to it, rounded up.
            response.headers["Retry-After"] = retry_after_header(int(reset) - time.time())
        return response

    # Each 429 is already in qna's request log; flask-limiter's line about it is not
    # needed twice. (The same filter object each time: it is added once.)
    logging.getLogger("flask-limiter").addFilter(_not_a_breach)
    limiter = Limiter(
        _client_key,
        app=app,
        # One budget per client across all routes, not one per route.
        application_limits=[limit],
        storage_uri=storage_uri,
        headers_enabled=True,
        retry_after="delta-seconds",
        # A wrong method on an uncounted route (`POST /healthz`, a 405) is not counted
        # either: as for the token, it is that route's request.
        application_limits_exempt_when=lambda: (
            _routed_endpoint() in UNLIMITED_ENDPOINTS or _is_options()
        ),
        storage_options=_store_options(storage_uri),
        # A rate-limit store that is down must not take the whole API with it, nor
        # switch the limit off: each process counts on its own meanwhile (logged), and
        # goes back to the store once it answers again.
        in_memory_fallback_enabled=True,
        swallow_errors=True,
        key_prefix="qna",
        # The limiter passes over a request with no endpoint (no route: a 404, or a
        # method the route does not take: a 405). Counted like any other, so that a
        # token cannot be guessed without limit on a URL with no route (a valid one
        # gets the 404, a wrong one the 401).
        request_identifier=lambda: request.endpoint or "unrouted",
    )

    @app.after_request
    def keep_own_retry_after(response: Response) -> Response:
        g.own_retry_after = response.headers.get("Retry-After")
        return response

    return limiter
