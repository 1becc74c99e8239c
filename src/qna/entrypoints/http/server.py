"""`qna serve`: the Flask application under gunicorn, the production WSGI server.

Worker model: gunicorn's `gevent` workers (the default). An ask spends nearly all its
time waiting for the LLM with no database connection held, so each worker holds many
asks at once, each a greenlet parked on a socket, while the database pool stays
small. psycopg2 is made cooperative with psycogreen's wait callback (keeping to the
connect timeout: adapters/sqlalchemy/green.py), so a database round trip parks its
greenlet instead of the whole worker. Greenlets switch in user
space with no GIL hand-offs: with hundreds of asks in flight this costs about a third
less CPU per ask than as many OS threads (`--worker-class gthread`, still available;
see the README, Performance).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import glob
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import uuid
from typing import Any
from urllib.parse import urlsplit

import gevent
from gunicorn import glogging as gunicorn_glogging
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.ggevent import GeventWorker
from gunicorn.workers.gthread import ThreadWorker

from qna.adapters.structured_logging import JsonFormatter, configure_logging
from qna.config import Settings, misread_variables, without_secrets
from qna.container import check_llm_settings, create_container, shutdown, upgrade_database
from qna.domain.errors import StorageUnavailable
from qna.entrypoints.http.codes import code_for
from qna.entrypoints.http.hosts import binds_loopback

log = logging.getLogger("qna.serve")


def _json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    # gunicorn answers requests it cannot parse (oversized headers, bad request
    # lines) itself, with an HTML page; our contract is JSON for every error, and an
    # X-Request-ID on every response (new: the request's own was not read).
    if status_int == 501:
        # gunicorn's one 501 (with the reason "Bad Request"): a Transfer-Encoding it
        # cannot take off. The app answers those it is handed 400 bad_request; one
        # answer to one mistake, whichever of the two meets it.
        status_int, reason = 400, "Bad Request"
    code = code_for(status_int)
    body = json.dumps({"error": {"code": code, "message": mesg or reason}}).encode()
    request_id = uuid.uuid4().hex
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {request_id}\r\n\r\n"
    ).encode("latin-1")
    # The request's line in the log, as the app writes one for each it answers (its
    # method and path unknown: it could not be read), so the id can be traced.
    _request_log.info(
        "request", extra={"status": status_int, "code": code, "request_id": request_id}
    )
    gunicorn_util.write_nonblock(sock, head + body)


# The app's request log (app.py), which the workers' app sends to stderr as JSON.
_request_log = logging.getLogger("qna.http")


class JsonLogger(gunicorn_glogging.Logger):  # type: ignore[misc]
    """gunicorn's own log lines (starting, workers booting, a request it could not
    read) as JSON lines, as qna's are: one stream a program can read."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            if getattr(handler, "_gunicorn", False):
                handler.setFormatter(JsonFormatter())


class ClosingResponse(gunicorn_wsgi.Response):  # type: ignore[misc]
    """gunicorn's response, closing the connection when what follows the request on
    it cannot be trusted, and saying so (`Connection: close`).

    After a request whose body could not be read (a malformed chunk: where the next
    request starts is unknown), gunicorn closes the connection, but it chose the
    Connection header without looking: the 400 said keep-alive, and a client or a
    proxy's pool sent its next request into a connection that was going away.
    After a 413 the body was refused unread: kept open, the connection had gunicorn
    read and discard all the client went on sending before the next request. After
    a 408 the body stopped arriving part of the way.
    """

    def should_close(self) -> bool:
        body = getattr(self.req, "body", None)
        return (
            bool(super().should_close())
            or getattr(body, "failed", False) is True
            or self.status_code in (408, 413)
        )


class ReadOrLeave:
    """A client's socket whose `sendall` gives up once the client has read nothing for
    `stall_s` (QNA_SEND_TIMEOUT_S, set before the workers fork): a client that asks
    and never reads held its connection (one of the worker's --connections) for ever,
    and a few hundred such took a worker down.
    Not gevent's own socket timeout: that bounds a whole `sendall`, which a slow
    client reading a large page may rightly outlast."""

    stall_s = 30.0

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendall(self, data: bytes, flags: int = 0) -> None:
        # EPIPE, as for a client that went away: gunicorn closes the connection and
        # logs nothing (it is the client's doing, not the server's).
        stalled = BrokenPipeError(errno.EPIPE, f"no read for {self.stall_s:g} s")
        view = memoryview(data).cast("B")
        while view:
            with gevent.Timeout(self.stall_s, stalled):
                sent = self._sock.send(view, flags)
            view = view[sent:]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class GreenResponse(ClosingResponse):
    """ClosingResponse, written to a client that must go on reading (ReadOrLeave)."""

    def __init__(self, req: Any, sock: socket.socket, cfg: Any) -> None:
        super().__init__(req, ReadOrLeave(sock), cfg)


def _adapt_gunicorn(response: type[ClosingResponse] = ClosingResponse) -> None:
    # In each worker, before it serves: wsgi.create builds gunicorn's Response by name.
    gunicorn_util.write_error = _json_error
    gunicorn_wsgi.Response = response


class JsonErrorThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's threaded worker, answering its own parse errors in JSON."""

    def init_process(self) -> None:
        _adapt_gunicorn()
        super().init_process()


class JsonErrorGeventWorker(GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker with a cooperative psycopg2, answering its own parse
    errors in JSON."""

    def patch(self) -> None:
        super().patch()  # gevent's monkey.patch_all(), first thing in the new worker
        from qna.adapters.sqlalchemy.green import make_psycopg_cooperative

        make_psycopg_cooperative()

    def init_process(self) -> None:
        _adapt_gunicorn(GreenResponse)
        super().init_process()


WORKER_CLASSES = {"gevent": JsonErrorGeventWorker, "gthread": JsonErrorThreadWorker}


class QnAArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's master, remembering a fast stop.

    Ctrl-C (SIGINT) and SIGQUIT stop the server at once, cutting off asks in flight;
    gunicorn then exits 0, as after SIGTERM's drain, so a script could not tell the
    two apart. `qna serve` exits 128 + the signal instead, as a shell reports a
    program a signal ended (130, 131); SIGTERM stays 0.
    """

    fast_stop: int | None = None

    def signal(self, sig: int, frame: Any) -> None:
        # Noted as it arrives, not when it is handled: during SIGTERM's drain gunicorn
        # takes a SIGINT or SIGQUIT off its queue itself ("Quick shutdown requested"),
        # and its handlers never run. Only in the master: a worker just forked runs
        # this handler until it installs its own.
        if sig in (signal.SIGINT, signal.SIGQUIT) and os.getpid() == self.pid:
            self.fast_stop = self.fast_stop or sig
        super().signal(sig, frame)

    def kill_workers(self, sig: int) -> None:
        # gunicorn's stop ends so: SIGKILL for the workers still busy when the
        # graceful timeout is up. Their asks are cut off (their records pending, until
        # they count as abandoned), and nothing else would say so.
        if sig == signal.SIGKILL and self.WORKERS and os.getpid() == self.pid:
            # JSON like every line, through a handler set up for this line only: one
            # left on the master would be inherited by each worker forked later, which
            # would then write each of its lines twice.
            with contextlib.contextmanager(configure_logging)(self.cfg.loglevel):
                log.warning(
                    "graceful timeout (%d s) up: killed %d busy worker(s); asks in flight cut off",
                    self.cfg.graceful_timeout,
                    len(self.WORKERS),
                )
        super().kill_workers(sig)


class QnAServer(BaseApplication):  # type: ignore[misc]
    def __init__(
        self, options: dict[str, Any], allowed_hosts: frozenset[str] | None = None
    ) -> None:
        self._options = options
        self._allowed_hosts = allowed_hosts
        super().__init__()

    def run(self) -> None:
        arbiter = QnAArbiter(self)
        try:
            arbiter.run()
        except SystemExit as stop:
            # The master's own exit: a worker (a forked copy of it) exits without a
            # fast stop of its own, whatever the master was told.
            if not stop.code and arbiter.fast_stop is not None:
                raise SystemExit(128 + arbiter.fast_stop) from None
            raise

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after the fork: every worker builds its own container,
        # engine and LLM client; nothing with a socket is shared across processes.
        from qna.entrypoints.http.app import create_app

        return create_app(allowed_hosts=self._allowed_hosts)


def _child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def _address(host: str, port: int) -> str:
    """host:port as gunicorn binds it, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CannotListen(Exception):
    """The address `qna serve` was told to listen on cannot be had."""


def allowed_hosts(settings: Settings, host: str) -> frozenset[str] | None:
    """The names the server answers to, besides this machine's loopback ones; None for
    any. On a loopback --host (the default) only those, unless QNA_ALLOWED_HOSTS adds
    some (or is *); elsewhere any, unless QNA_ALLOWED_HOSTS lists some (hosts.py)."""
    names = [name for name in settings.allowed_hosts.split(",") if name]
    if names == ["*"] or (not names and not binds_loopback(host)):
        return None
    return frozenset(names)


def check_can_listen(host: str, port: int) -> None:
    """Bind the address as gunicorn will, and let it go again.

    gunicorn meets a port in use with five retries a second apart, two log lines each,
    and exit 1; this says so in one line first. (Another process could still take the
    port in the moment between the two binds; gunicorn then reports it.)
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = _address(host, port)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
            probe.bind((host, port))
    except OSError as exc:  # in use, not this machine's address, a privileged port, ...
        reason = (exc.strerror or str(exc)).lower()
        if _is_link_local(host):
            # bind() takes the interface of a link-local address only as a scope id,
            # which gunicorn's (host, port) cannot carry: it fails as this probe does,
            # with an "invalid argument" that says nothing of why.
            reason = (
                "a link-local address (fe80::/10) needs its network interface, which "
                "gunicorn cannot be given; use --host :: to listen on every address"
            )
        raise CannotListen(f"cannot listen on {where}: {reason}") from exc


def _is_link_local(host: str) -> bool:
    try:
        return ipaddress.IPv6Address(host).is_link_local  # takes a %scope too
    except ValueError:
        return False


def migrate_before_serving(settings: Settings, *, workers: int = 1) -> None:
    """Migrate once, in the master, before any worker starts; a database that is down
    does not stop the server (it answers 503 until the database is back), one that
    waiting cannot mend (a file that is not a database, a schema qna does not know)
    does: StorageUnavailable, not a server answering 503 for ever. So does one
    that refuses DATABASE_URL's login: a ConfigurationError, as a missing API key is."""
    container = create_container(settings)
    # The master's own lines (the database not ready, abandoned asks closed) are JSON,
    # as the workers' are; undone by the shutdown below, before the workers fork.
    container.logging.init()
    for line in misread_variables():
        log.warning(line)
    try:
        try:
            # A server that cannot ask anything should not start: say which setting is
            # missing now, not as a 503 on every ask. Checked, not built: the LLM client
            # and its HTTP stack must first be imported in the workers, after gevent.
            config = container.config
            check_llm_settings(
                config.llm_client(), config.openai_api_key(), config.openai_base_url()
            )
            upgrade_database(container)
            closed = container.reap_abandoned()()
            if closed:
                log.warning("marked %d abandoned pending asks as failed", closed)
        except StorageUnavailable as exc:
            if not exc.retryable:
                raise
            log.warning("database not ready at start (migrations, abandoned asks): %s", exc.message)
        # Once it is known to start: a server that refuses to says one line, why.
        _tell_what_it_serves(settings, workers)
    finally:
        shutdown(container)


def _tell_what_it_serves(settings: Settings, workers: int) -> None:
    """One line on how the server is set up (which database, whether a token is asked
    for), so that whoever starts it sees what they started; and a warning when a rate
    limit is kept per worker."""
    limit = settings.rate_limit.strip()
    log.info(
        "serving",
        extra={
            "database": without_secrets(settings.effective_database_url, database=True),
            "model": settings.model,
            "llm_client": settings.llm_client,
            "auth": "tokens" if settings.tokens else "off",
            "rate_limit": limit or "off",
            "cache_ttl_s": settings.cache_ttl_s,
            "workers": workers,
        },
    )
    in_memory = urlsplit(settings.rate_limit_storage.strip()).scheme.lower() == "memory"
    if limit and workers > 1 and in_memory:
        log.warning(
            "QNA_RATE_LIMIT is counted by each of the %d workers on its own (memory://): "
            "a client may make up to %d times as many requests, and X-RateLimit-Remaining "
            "depends on the worker that answers; set QNA_RATE_LIMIT_STORAGE to a shared "
            "store (redis://...) to count them together",
            workers,
            workers,
        )


def prepare_multiprocess_metrics(workers: int) -> None:
    """With several workers, each writes its metrics to files that /metrics adds up.

    Must run before anything imports prometheus_client (the HTTP application does;
    the master never imports it, the workers load it after the fork).
    """
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        remove_abandoned_metrics_directories()
        directory = make_metrics_directory()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        master = os.getpid()

        def remove_when_the_master_exits() -> None:
            # Workers inherit this through fork and exit on their own (a SIGHUP
            # reload replaces them all): the directory outlives them, as the server does.
            if os.getpid() == master:
                shutil.rmtree(directory, ignore_errors=True)

        atexit.register(remove_when_the_master_exits)


METRICS_PREFIX = "qna-metrics-"
# Locked for as long as the server that made the directory runs (its master, and the
# workers that inherit the descriptor): the kernel lets go of it however they end.
_OWNER_LOCK = "owner.lock"


def make_metrics_directory(root: str | None = None) -> str:
    """A new metrics directory under `root` (the temporary directory), held by this
    process until it ends."""
    directory = tempfile.mkdtemp(prefix=METRICS_PREFIX, dir=root)
    # Locked before it has its name: a sweeping server never finds it unlocked. The
    # descriptor is never closed: the lock lasts as long as the process (and its
    # forked workers, which share it).
    claimed = os.path.join(directory, f".{_OWNER_LOCK}")
    descriptor = os.open(claimed, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.rename(claimed, os.path.join(directory, _OWNER_LOCK))
    return directory


def remove_abandoned_metrics_directories(root: str | None = None) -> None:
    """Remove the metrics directories that servers killed outright (SIGKILL, the OOM
    killer) left behind: atexit never ran in them. A directory is abandoned when its
    owner lock is free; one without a lock (being made, or from an older qna) is kept.
    A lock, not a process id: that is right across PID namespaces sharing /tmp too."""
    for directory in glob.glob(os.path.join(root or tempfile.gettempdir(), f"{METRICS_PREFIX}*")):
        try:
            descriptor = os.open(os.path.join(directory, _OWNER_LOCK), os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its server runs
        else:
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(descriptor)


def serve(
    *,
    host: str,
    port: int,
    workers: int,
    worker_class: str = "gevent",
    connections: int = 1000,
    threads: int = 256,
    graceful_timeout: int = 30,
) -> None:
    settings = Settings()
    # Before the database is touched: a server that cannot listen changes nothing.
    check_can_listen(host, port)
    migrate_before_serving(settings, workers=workers)
    # After the checks above: a server that refuses to start leaves no trace in the
    # environment of whoever called it.
    prepare_multiprocess_metrics(workers)
    ReadOrLeave.stall_s = settings.send_timeout_s  # the workers inherit it
    options: dict[str, Any] = {
        "bind": _address(host, port),
        "workers": workers,
        "worker_class": f"{__name__}.{WORKER_CLASSES[worker_class].__name__}",
        "threads": threads if worker_class == "gthread" else 1,
        # A thread waiting on the LLM must not look like a hung worker.
        "timeout": 0,
        "graceful_timeout": graceful_timeout,
        "keepalive": 5,
        # A file (the /docs assets) is written through ReadOrLeave too, not handed to
        # the kernel's sendfile(), which no stall limit would reach.
        "sendfile": False,
        # gunicorn takes SCRIPT_NAME and PATH_INFO from request headers of local
        # clients by default: any of them could strip a path prefix past a proxy's
        # rules, point Location and the OpenAPI servers elsewhere, or make a 500.
        # qna is served at the root; a proxy that mounts it elsewhere rewrites paths.
        "forwarder_headers": "",
        # gevent: asks one worker holds at once; gthread: connections it keeps open.
        "worker_connections": connections if worker_class == "gevent" else max(1000, threads * 4),
        "backlog": 2048,
        "accesslog": None,
        "errorlog": "-",
        "logger_class": f"{__name__}.{JsonLogger.__name__}",
        "loglevel": settings.log_level.lower(),
        "proc_name": "qna",
        # gunicorn's control socket has one default path per user: two servers on
        # one machine (tests, blue/green) would fight over it, and qna does not use it.
        "control_socket_disable": True,
        "child_exit": _child_exit if workers > 1 else None,
    }
    QnAServer(
        {k: v for k, v in options.items() if v is not None}, allowed_hosts(settings, host)
    ).run()
