"""The Flask application factory."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

from qna.config import Settings
from qna.container import Container, create_container
from qna.entrypoints.http import views
from qna.entrypoints.http.errors import register_error_handlers
from qna.entrypoints.http.openapi import openapi_document

log = logging.getLogger("qna.http")

# A client's request id is echoed only if it is short and plain: it ends up in logs.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(container: Container | None = None, settings: Settings | None = None) -> Flask:
    """Build the HTTP application over `container` (default: built from `settings`,
    or from the environment and `.env`)."""
    if container is None:
        container = create_container(settings)
    app = Flask("qna")
    app.config["MAX_CONTENT_LENGTH"] = container.config.max_body_bytes()
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["qna.container"] = container
    app.extensions["qna.openapi"] = openapi_document(
        max_question_length=container.config.max_question_length(),
        max_body_bytes=container.config.max_body_bytes(),
        auth=False,
    )
    container.logging.init()
    container.wire(modules=[views])
    app.register_blueprint(views.bp)
    register_error_handlers(app)
    _install_request_log(app)
    return app


def _install_request_log(app: Flask) -> None:
    @app.before_request
    def start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def finish(response: Response) -> Response:
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        started = g.get("started")
        duration_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
        # Never the question or the body: they are the users' data, not operations data.
        log.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": duration_ms,
                "request_id": request_id,
            },
        )
        return response
