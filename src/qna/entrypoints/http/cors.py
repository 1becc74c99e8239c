"""Which browser front-ends on other origins may call the API (QNA_CORS_ORIGINS)."""

from __future__ import annotations

import re

from flask import Flask, Response
from flask_cors import CORS
from werkzeug.datastructures import HeaderSet
from werkzeug.http import parse_set_header

# What a front-end sends beyond the CORS-safelisted headers: its token, its JSON body's
# type, its retry key, and the request id the API echoes.
ALLOWED_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
# What the API documents for a client to read, beyond the headers a browser always shows
# (Content-Type, Content-Length, ...): without them, a script could not see when to
# retry, where the stored record is, or why a token was refused.
EXPOSED_RESPONSE_HEADERS = [
    "Allow",
    "Location",
    "Retry-After",
    "WWW-Authenticate",
    "X-Request-ID",
    # With QNA_RATE_LIMIT: a front-end may show what is left of the budget.
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
]
# How long a browser may reuse a preflight's answer before asking again.
PREFLIGHT_MAX_AGE_S = 600


def install_cors(app: Flask, origins: list[str]) -> None:
    """Let browsers on `origins` (exact origins as config.py writes them, or ["*"]) call
    the API and read its responses, errors included. No origins: no CORS headers."""
    if not origins:
        return
    any_origin = origins == ["*"]
    CORS(
        app,
        # flask-cors reads an origin with a bracket, a "$" or a "*" in it as a regular
        # expression, and matches a pattern only at the start: "http://[::1]:8080"
        # matched "http://1:8080". Each one is matched whole, as the literal it is.
        origins="*" if any_origin else [re.compile(re.escape(o) + r"\Z", re.I) for o in origins],
        # "*" itself, not the caller's origin echoed: nothing can be sent with credentials.
        send_wildcard=any_origin,
        supports_credentials=False,  # a bearer token is a header, not a cookie
        methods=["GET", "HEAD", "POST", "OPTIONS"],
        allow_headers=ALLOWED_REQUEST_HEADERS,
        expose_headers=EXPOSED_RESPONSE_HEADERS,
        max_age=PREFLIGHT_MAX_AGE_S,
        # A request without Origin is not a browser's cross-origin one: no headers
        # (flask-cors would otherwise list every allowed origin to anyone).
        always_send=False,
        # Every error reaches the client through an error handler, and so through the
        # after-request hook that adds the headers: no need to wrap Flask's own.
        intercept_exceptions=False,
        # Vary is set below, on every response: flask-cors sets it only on those it
        # gives CORS headers to, and as a header line of its own.
        vary_header=False,
    )
    if not any_origin:
        _vary_on_origin(app)


def _vary_on_origin(app: Flask) -> None:
    """`Vary: Origin` on every response, not only on those to an allowed origin: a
    shared cache that kept a response made for another origin, or for none (without
    CORS headers), would otherwise serve it to an allowed origin, whose browser then
    refuses it. With "*" every origin gets the same answer, and nothing varies."""

    @app.after_request
    def vary(response: Response) -> Response:
        names = HeaderSet()
        for line in response.headers.getlist("Vary"):
            names.update(parse_set_header(line))
        if "*" not in names:  # varies on everything already
            names.add("Origin")
        response.headers["Vary"] = names.to_header()
        return response
