"""The routes: each one parses the request, calls a use case, and shapes the response."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    request,
    send_file,
)
from pydantic import ValidationError
from werkzeug.wrappers import Response as WerkzeugResponse

from qna.adapters.llm_pool import under_gevent
from qna.application.ports import UnitOfWorkFactory
from qna.application.use_cases import GetQnA, ListQnA, parse_idempotency_key
from qna.config import ConfigurationError
from qna.container import Container, ask_question_for
from qna.domain.errors import StorageUnavailable
from qna.domain.model import QnA
from qna.entrypoints.http import metrics, swagger_ui
from qna.entrypoints.http.errors import ApiError, database_retry_after, error_response
from qna.entrypoints.presenters import AskRequest, QnAOut, QnAPage

bp = Blueprint("qna", __name__)
log = logging.getLogger("qna.http")

# application/json, or a type with the +json suffix (RFC 6839) and a name before it.
_TOKEN = r"[a-z0-9!#$&^_.-]+"
_JSON_MEDIA_TYPE = re.compile(rf"application/json|{_TOKEN}/{_TOKEN}\+json")
_DECLARES_CHARSET = re.compile(r";\s*charset\s*=", re.IGNORECASE)


def _json_body() -> bytes:
    if not _JSON_MEDIA_TYPE.fullmatch(request.mimetype or ""):
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        )
    # JSON between systems is UTF-8 (RFC 8259, section 8.1), and it is what the body is
    # parsed as: a body declared as another charset would be read as something else.
    charset = request.mimetype_params.get("charset")
    if charset is None and _DECLARES_CHARSET.search(request.headers.get("Content-Type", "")):
        # Declared, but not as a value werkzeug could read (`charset=`, a non-ASCII
        # name): it left it out, and the body was read as UTF-8 all the same.
        charset = ""
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Send the body as UTF-8 JSON; charset={charset[:40]} is not supported.",
        )
    # A compressed body would be parsed as if it were plain (a 400 about its JSON, or
    # worse, accepted); RFC 9110, section 15.5.16: a content coding the server does
    # not support is a 415.
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Send the body uncompressed; Content-Encoding: {encoding[:40]} is not supported.",
        )
    # gunicorn takes the chunked framing off "Transfer-Encoding: gzip, chunked" and
    # hands over what lies under it, still gzipped; every other coding it cannot take
    # off (gzip alone, identity) it refuses itself, with 400 bad_request: so do we.
    transfer = request.headers.get("Transfer-Encoding")
    if transfer is not None and transfer.strip().lower() != "chunked":
        raise ApiError(
            400,
            "bad_request",
            f"Send the body chunked or with a Content-Length; Transfer-Encoding: "
            f"{transfer[:40]} is not supported.",
        )
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    with _arriving_within(current_app.config["QNA_BODY_TIMEOUT_S"]):
        # Reading enforces MAX_CONTENT_LENGTH (413) when the length is declared.
        body = request.get_data(cache=False)
        # A chunked body is cut at the limit without an error; one more byte from the
        # raw input (the limited stream reports itself exhausted) tells whether it was.
        # (A declared length over the limit was refused by get_data already.)
        too_large = len(body) >= limit and request.environ["wsgi.input"].read(1)
    if too_large:
        raise ApiError(413, "payload_too_large", "The request body is too large.")
    # gunicorn ends the body where the client stopped sending, even short of the
    # declared length: the request never arrived whole, whatever its prefix parses as.
    declared = request.content_length
    if declared is not None and len(body) < declared:
        raise ApiError(400, "bad_request", "The body ended before its Content-Length.")
    return body


@contextlib.contextmanager
def _arriving_within(seconds: float) -> Iterator[None]:
    """The request body read inside must arrive within `seconds`, else 408: a client
    that sent its headers, then stalled (or dripped) its body, held its connection
    and a place among the worker's --connections for good, also through a SIGTERM's
    graceful stop. In a gevent worker the whole read is bounded; in a gthread one,
    each wait for the socket (a thread cannot be interrupted)."""
    if under_gevent():
        import gevent

        timer = gevent.Timeout(seconds)
        try:
            with timer:
                yield
        except gevent.Timeout as fired:
            if fired is not timer:
                raise  # another's deadline
            raise _body_too_slow(seconds) from None
        return
    sock = request.environ.get("gunicorn.socket")
    if sock is None:  # not under gunicorn: a test client, another WSGI server
        yield
        return
    before = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        yield
    except Exception as exc:
        # werkzeug reports a failed read (an OSError, as a timeout is) as the client
        # gone: a 400 ClientDisconnected raised while handling it.
        if _timed_out(exc):
            raise _body_too_slow(seconds) from None
        raise
    finally:
        sock.settimeout(before)


def _timed_out(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _body_too_slow(seconds: float) -> ApiError:
    return ApiError(
        408, "request_timeout", f"The request body did not arrive within {seconds:g} s."
    )


def _parse_ask(body: bytes) -> AskRequest:
    if b"NaN" in body or b"Infinity" in body:
        _refuse_non_json_numbers(body)
    try:
        parsed = AskRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(
                400, "invalid_json", f"The body is not valid JSON: {first['msg']}."
            ) from None
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, "invalid_request", f"{where}: {first['msg']}.") from None
    _refuse_duplicate_keys(body)
    return parsed


def _refuse_duplicate_keys(body: bytes) -> None:
    """pydantic's parser keeps the last of two equal keys without a word: a client (or
    a proxy appending a field) would be answered a question it did not check. Which
    one was meant cannot be known, so neither is taken.

    A second parse, run only on bodies pydantic accepted (valid JSON, at most 200
    deep), and only when a key can be there twice: an object of two members has two
    name separators, while the usual ask, {"question": ...}, has one colon at all.
    """
    if body.count(b":") > 1:
        _KEY_CHECK.decode(body.decode())


def _refuse_non_json_numbers(body: bytes) -> None:
    """pydantic's parser takes NaN, Infinity and -Infinity, which JSON has not (an
    ignored field holding one made the body pass). A second parse, run only on
    bodies that name one, perhaps inside a string."""
    # Not JSON, or not UTF-8, anyway (ValueError), or nested past what this parser
    # takes (RecursionError): pydantic's parse says where, or that it is too deep.
    with contextlib.suppress(ValueError, RecursionError):
        _NUMBER_CHECK.decode(body.decode())


def _not_a_json_number(constant: str) -> None:
    raise ApiError(400, "invalid_json", f"The body is not valid JSON: {constant} is no JSON value.")


_NUMBER_CHECK = json.JSONDecoder(parse_constant=_not_a_json_number)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # In ASCII escapes: the key is the client's, whatever it holds.
                raise ApiError(
                    400,
                    "invalid_request",
                    f"The key {json.dumps(key[:40])} is given twice in one object; "
                    "give each key once.",
                )
            seen.add(key)
    return members


# Made once: json.loads with arguments builds a decoder per call, which costs more than
# the parse. parse_int=str: an integer of any length is not this check's business.
_KEY_CHECK = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_int=str)


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    parse_idempotency_key(key, name="Idempotency-Key")
    # Scoped by caller: two clients choosing the same key never see each other's asks.
    return f"{g.get('principal', 'anonymous')}:{key}"


def _record_response(qna: QnA, status: int = 200) -> Response:
    # One pydantic call straight to JSON (what jsonify(qna_to_dict(...)) gives, with
    # this app's JSON settings, for half the CPU): /ask's hot path.
    payload = QnAOut.from_domain(qna).model_dump_json().encode() + b"\n"
    return Response(payload, status=status, mimetype="application/json")


def _container() -> Container:
    # The app's own container, not module-level wiring: wiring is global to this
    # module, so two apps in one process (tests, embedding) would share the last one.
    container: Container = current_app.extensions["qna.container"]
    return container


def units_of_work() -> UnitOfWorkFactory:
    """The units of work the use cases open: the container's, behind the schema guard
    (app.py `_install_schema_guard`), so that the database is first asked once the
    request has passed every check that needs none."""
    factory: UnitOfWorkFactory = current_app.extensions["qna.unit_of_work"]
    return factory


@bp.post("/ask")
def ask() -> Response:
    body = _parse_ask(_json_body())
    # No LLM setting (an embedded app): a question wrong on its face is still told 400,
    # which no setting mends, not 503.
    ask_question = ask_question_for(_container(), body.question, uow=units_of_work())
    asked = ask_question.ask(body.question, fresh=body.fresh, idempotency_key=_idempotency_key())
    qna = asked.qna
    if not asked.replayed:  # a replay asked nothing: counting it again would inflate
        metrics.record_ask(qna)
    response = _record_response(qna, status=201)
    # Relative to this request's URL (RFC 9110 allows it): /questions/<id> at the root,
    # and under a prefix a proxy strips (/qna/ask -> /qna/questions/<id>), which an
    # absolute path left; the app cannot know that prefix. Built by hand: url_for
    # costs more than the rest of the view.
    response.headers["Location"] = f"questions/{qna.id}"
    return response


@bp.get("/questions")
def list_questions() -> Response:
    for name in ("limit", "cursor", "status"):
        # Which one was meant cannot be known; taking the first would answer a guess.
        if len(request.args.getlist(name)) > 1:
            raise ApiError(400, "invalid_argument", f"Give {name} at most once.")
    limit = _parse_limit(request.args.get("limit", str(ListQnA.DEFAULT_LIMIT)))
    list_qna: ListQnA = _container().list_qna(uow=units_of_work())
    # An empty cursor is passed on, and refused: no page gives it out, and read as none
    # it was the first page again, so a client paging on after the last one looped.
    page = list_qna(
        limit=limit, cursor=request.args.get("cursor"), status=request.args.get("status")
    )
    body = QnAPage(items=[QnAOut.from_domain(q) for q in page.items], next=page.next_cursor)
    return jsonify(body.model_dump(mode="json"))


def _parse_limit(text: str) -> int:
    """`limit` as decimal digits, leading zeros allowed (they write the same integer, as
    `qna history -n 0005` reads it); only the digits after them are bounded in length,
    or "0005" was refused while "007" was not."""
    significant = text.lstrip("0")
    # isdigit() alone admits "²" and 5000-digit numbers, which int() refuses.
    if not (
        text.isascii()
        and text.isdigit()
        and len(significant) <= 3
        and 1 <= int(significant or "0") <= ListQnA.MAX_LIMIT
    ):
        raise ApiError(
            400, "invalid_argument", f"limit must be an integer from 1 to {ListQnA.MAX_LIMIT}."
        )
    return int(significant)


@bp.get("/questions/<qna_id>")
def get_question(qna_id: str) -> Response:
    get_qna: GetQnA = _container().get_qna(uow=units_of_work())
    return _record_response(get_qna(qna_id))


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    try:
        # Migrates, once, if start-up could not (the database was down then).
        current_app.extensions["qna.schema_up_to_date"]()
        ready = _container().schema_ready()
    except ConfigurationError as exc:
        # The database refused DATABASE_URL's login: a setting to fix, as on every route.
        return error_response(503, "misconfigured", _told_to_anyone(exc.message))
    except StorageUnavailable as exc:
        # Not through the error handler: a probe's failure is not a request's, for the
        # logs and the database error count. Retry-After as on every other 503.
        return error_response(
            503,
            "database_unavailable",
            _told_to_anyone(exc.message),
            database_retry_after(exc),
        )
    if not ready:
        return error_response(
            503, "migrations_pending", "The database schema is not at the newest migration."
        )
    return jsonify({"status": "ready"})


def _told_to_anyone(detail: str) -> str:
    """What the public probe says of a database it cannot use. With tokens on, not the
    driver's words (a host name, a database or user name, the server's address): the
    probe asks for no token, and the routes that do keep them for their callers. The
    log has them; without tokens, every route tells them anyway."""
    if not _container().config.api_tokens():
        return detail
    log.warning("not ready: %s", detail)
    return "The database cannot be used; the server's log says why."


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    payload, content_type = metrics.exposition()
    return Response(payload, content_type=content_type)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    document: dict[str, Any] = current_app.extensions["qna.openapi"]
    # Where the API is: "/" unless it is mounted under a prefix (SCRIPT_NAME), which
    # the paths do not carry; without it, /docs "Try it out" under /api called /ask.
    # script_root is decoded: quoted again (a space, "ü"), and "{" is no server variable.
    mounted_at = quote(request.script_root, safe="/")
    return jsonify({**document, "servers": [{"url": mounted_at or "/"}]})


@bp.get("/docs")
def docs() -> Response:
    response = Response(swagger_ui.DOCS_PAGE, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = swagger_ui.DOCS_CONTENT_SECURITY_POLICY
    return response


@bp.get("/docs/")
def docs_with_a_slash() -> WerkzeugResponse:
    # Typed as a directory's address: sent on to the page (its files are found from
    # /docs, not from /docs/). Relative, as /ask's Location is, to stay under a prefix.
    return redirect("../docs", code=308)


@bp.get("/docs/swagger-ui/<version>/<name>")
def docs_asset(version: str, name: str) -> Response:
    mimetype = swagger_ui.ASSET_TYPES.get(name)
    # Another version is a page from before an upgrade: its files are gone.
    if mimetype is None or version != swagger_ui.VERSION:
        abort(404)
    # Not conditional: never changing, a file needs no 304s, and werkzeug's answers to
    # If-Match and Range (a 412 with the file as its body, a 416) were no JSON errors.
    response = send_file(
        swagger_ui.asset_path(name),
        mimetype=mimetype,
        max_age=swagger_ui.ASSET_MAX_AGE_S,
        conditional=False,
        etag=False,  # a tag no request can use
    )
    response.cache_control.immutable = True
    return response
