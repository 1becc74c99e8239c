"""The Flask application factory."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from qna.application.ports import UnitOfWork
from qna.config import Settings
from qna.container import (
    Container,
    MigrationLockBusy,
    create_container,
    upgrade_database,
    warm_up,
)
from qna.domain.errors import StorageUnavailable
from qna.entrypoints.http import views
from qna.entrypoints.http.cors import install_cors
from qna.entrypoints.http.errors import register_error_handlers
from qna.entrypoints.http.hosts import install_host_check
from qna.entrypoints.http.openapi import openapi_document
from qna.entrypoints.http.security import install_access

log = logging.getLogger("qna.http")

# A client's request id is echoed only if it is short and plain: it ends up in logs.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class QnAFlask(Flask):
    def make_default_options_response(self) -> Response:
        # Flask answers OPTIONS itself with 200 and an empty text/html body; nothing
        # this API sends is HTML. 204: the Allow header is the whole answer.
        response = super().make_default_options_response()
        response.status_code = 204
        response.headers.pop("Content-Type", None)
        response.headers.pop("Content-Length", None)
        return response


def create_app(
    container: Container | None = None,
    settings: Settings | None = None,
    *,
    allowed_hosts: frozenset[str] | None = None,
) -> Flask:
    """Build the HTTP application over `container` (default: built from `settings`,
    or from the environment and `.env`). With `allowed_hosts`, it answers only to
    those names and this machine's loopback (`hosts.py`; `qna serve` decides)."""
    if container is None:
        container = create_container(settings)
    # No static folder: qna has none, and Flask's /static/<path> route answered for it.
    app = QnAFlask("qna", static_folder=None)
    # Werkzeug answers a path with doubled slashes with a 308 and an HTML page; this
    # API's paths are exact (a trailing slash is a 404 too), and never answered in HTML.
    # Leading slashes aside: werkzeug's request reads `//ask` as `/ask` before routing.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = container.config.max_body_bytes()
    app.config["QNA_BODY_TIMEOUT_S"] = container.config.body_timeout_s()
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["qna.container"] = container
    app.extensions["qna.openapi"] = openapi_document(
        max_question_length=container.config.max_question_length(),
        max_body_bytes=container.config.max_body_bytes(),
        auth=bool(container.config.api_tokens()),
        rate_limited=bool(container.config.rate_limit().strip()),
        host_checked=allowed_hosts is not None,
    )
    container.logging.init()
    warm_up(container)
    app.register_blueprint(views.bp)
    register_error_handlers(app)
    _install_request_log(app)
    if allowed_hosts is not None:  # first: a misdirected request costs nothing more
        install_host_check(app, allowed_hosts)
    # Tokens and rate limits before anything that touches the database: a request
    # without a valid token is turned away (and counted) before it costs more, and is
    # told 401 even while the database is down.
    install_access(
        app,
        container.config.api_tokens() or [],
        container.config.rate_limit(),
        container.config.rate_limit_storage(),
    )
    install_cors(app, container.config.cors_origins() or [])
    _install_schema_guard(app, container)
    proxies = container.config.trusted_proxies()
    if proxies:
        # Behind `proxies` proxies, the client is the address the nearest one saw, in
        # X-Forwarded-For: else every client is the proxy, and shares one rate-limit
        # bucket. Only that header: scheme, host and prefix stay the request's own.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=0, x_host=0)  # type: ignore[method-assign]
    return app


#: How long a request waits for another one's migration before it is told 503.
SCHEMA_WAIT_S = 1.0
#: How long after a migration found the table locked requests are told 503 at once.
SCHEMA_RETRY_S = 10.0


def _install_schema_guard(app: Flask, container: Container) -> None:
    """Migrate before the first unit of work a request opens, if start-up could not.

    `qna serve` migrates before the workers start; when the database was down then,
    the server still starts, and the first request (or /readyz probe) after the
    database comes back brings the schema up (serialised across processes by the
    migration lock).

    At the first unit of work, not before the view: by then the request has passed
    every check that needs no database (its body, question, Idempotency-Key, limit,
    cursor), so one wrong on its face is told 400 while the database is down, not 503
    (waiting cannot mend it), and the database is not asked for it at all. The views
    get their use cases' units of work from here (`views.units_of_work`).
    """
    ready = threading.Event()
    lock = threading.Lock()
    # After a try that found the table locked: until when no new try is made, and
    # what that try was told, told again meanwhile.
    busy: list[tuple[float, MigrationLockBusy]] = []
    open_unit_of_work = container.unit_of_work

    def ensure_schema() -> None:
        # A request that finds another one migrating waits for it only a moment, and
        # a try waits for the table's lock only once (LOCK_TIMEOUT_S): a probe gets
        # its 503 within its own timeout. They queued behind one another, 14 s each,
        # while another transaction held the table.
        if not lock.acquire(timeout=SCHEMA_WAIT_S):
            raise StorageUnavailable("The database schema is being brought up to date.")
        try:
            if ready.is_set():
                return
            if busy and time.monotonic() < busy[0][0]:
                # Each try queues every query on the table behind it while it waits.
                raise MigrationLockBusy(busy[0][1].message)
            try:
                if not container.schema_ready():
                    upgrade_database(container, patient=False)
            except MigrationLockBusy as exc:
                busy[:] = [(time.monotonic() + SCHEMA_RETRY_S, exc)]
                raise
            ready.set()
        finally:
            lock.release()

    def unit_of_work(*, autocommit: bool = False) -> UnitOfWork:
        if not ready.is_set():  # once ready, this check is all it costs
            ensure_schema()
        unit: UnitOfWork = open_unit_of_work(autocommit=autocommit)
        return unit

    def schema_up_to_date() -> None:
        if not ready.is_set():
            ensure_schema()

    app.extensions["qna.unit_of_work"] = unit_of_work
    # For /readyz: a server no request reaches (an orchestrator sends none until it is
    # ready) would otherwise wait for the schema forever.
    app.extensions["qna.schema_up_to_date"] = schema_up_to_date


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
        # Records echo what LLMs and clients wrote: never sniffed as HTML by a browser,
        # and never kept by a shared cache (they are one caller's questions).
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.mimetype == "application/json":
            response.headers.setdefault("Cache-Control", "no-store")
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
