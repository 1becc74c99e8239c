"""Throughput at the LLM's pace: `qna serve` against a fake LLM, next to the floor and
the original design, under wrk. Run it with `bash bench/run [--smoke]` (which installs
wrk and Flask-SQLAlchemy and starts PostgreSQL first).

Everything runs on 127.0.0.1, started and stopped here:
  - one fake OpenAI-compatible server per LLM latency (bench/fake_llm.py, a bare
    asyncio server that also counts its calls), also loaded alone by wrk to show
    it is not the bottleneck;
  - the bare SDK call in a loop (the floor);
  - bench/baseline_app.py under `gunicorn -w 2` (the original design);
  - `qna serve --workers $BENCH_WORKERS $BENCH_QNA_ARGS` on a fresh PostgreSQL database
    (dropped at exit), twice: with its defaults (the openai SDK), and with
    QNA_LLM_CLIENT=http (the lean client), each under the same loads.

Each scenario checks that the database holds one answered row per answered ask. The
exit status is 1 when something is broken (errors, a row-count mismatch, an LLM call on
a cache hit), never for a missed speed target; 2 when the bench itself could not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import openai
import psycopg2

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
BIN = Path(sys.executable).parent
MODEL = "gpt-4o-mini"
QUESTION = "What is the capital of France?"
# Far above any latency a scenario expects, so every response lands in wrk's histogram
# (wrk leaves out of its percentiles the responses slower than its timeout).
WRK_TIMEOUT_S = 10
RSS_TARGET_MB = 500.0


class BenchError(Exception):
    """The bench could not run (a server did not start, wrk failed...)."""


# -- plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    key: str
    title: str
    clients: int
    llm_latency_s: float
    duration_s: float
    warmup_s: float
    mode: str = "ask"  # "ask": a new question each time; "same": one question (cache hits)

    @property
    def threads(self) -> int:
        return min(2, self.clients)

    @property
    def llm(self) -> str:
        return f"{self.llm_latency_s * 1000:g} ms"


#: The qna configurations measured: a name for the table, and their settings.
QNA_SYSTEMS = (("qna", {}), ("qna (http client)", {"QNA_LLM_CLIENT": "http"}))


@dataclass(frozen=True)
class Plan:
    smoke: bool
    workers: int
    serve_args: tuple[str, ...]
    latency: Load
    saturation: Load
    concurrency: Load
    cache: Load

    @classmethod
    def make(cls, *, smoke: bool, workers: int, serve_args: Sequence[str] = ()) -> Plan:
        # wrk takes whole seconds.
        d, w = (1.0, 1.0) if smoke else (10.0, 2.0)
        slow = 0.2 if smoke else 1.0
        return cls(
            smoke=smoke,
            workers=workers,
            serve_args=tuple(serve_args),
            latency=Load("latency", "1 client, 0 ms LLM", 1, 0.0, d, w),
            saturation=Load("saturation", "50 clients, 0 ms LLM", 50, 0.0, d if smoke else 15.0, w),
            concurrency=Load(
                "concurrency",
                f"{20 if smoke else 500} clients, {slow * 1000:g} ms LLM",
                20 if smoke else 500,
                slow,
                d if smoke else 20.0,
                w if smoke else 5.0,
            ),
            cache=Load("cache", "cache hit, 1 client", 1, 0.0, d, w, mode="same"),
        )


# -- child processes -----------------------------------------------------------------------


class Children:
    """Every process the bench starts, each in its own process group, so a server and its
    workers stop together. Their pids also go to $BENCH_PIDFILE, for bench/run's trap."""

    def __init__(self, pidfile: str | None) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pidfile = Path(pidfile) if pidfile else None

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        LOGS.mkdir(parents=True, exist_ok=True)
        with open(LOGS / f"{name}.log", "ab") as log:
            log.write(f"\n== {datetime.now(UTC).isoformat()} {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                start_new_session=True,
            )
        self._procs.append(proc)
        if self._pidfile is not None:
            with self._pidfile.open("a") as f:
                f.write(f"{proc.pid}\n")
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Workers of a server that died first may still be around.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc, timeout=10)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(name: str, lines: int = 20) -> str:
    path = LOGS / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_http(url: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise BenchError(f"{name} did not answer {url} within {timeout:g} s:\n{log_tail(name)}")


def http_json(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# -- the servers ---------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]


@dataclass
class Fake(Server):
    base_url: str = ""
    calls_url: str = ""

    def calls(self) -> int:
        _, body = http_json(self.calls_url)
        return int(body["calls"])


def start_fake(children: Children, latency_s: float) -> Fake:
    name = f"fake-llm-{latency_s * 1000:g}ms"
    proc = children.spawn(
        name,
        [sys.executable, str(BENCH / "fake_llm.py"), "--latency", str(latency_s)],
        cwd=REPO,
        stdout_pipe=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise BenchError(f"{name} did not start:\n{log_tail(name)}")
    urls = json.loads(line)
    base_url = str(urls["base_url"])
    return Fake(name, base_url, proc, base_url=base_url, calls_url=str(urls["calls_url"]))


def server_env(database_url: str, fake: Fake, qna: dict[str, str] | None = None) -> dict[str, str]:
    # The servers see no qna setting from the calling shell, only the bench's own; the
    # qna servers also BENCH_QNA_ENV="NAME=value ...", for experiments
    # (e.g. QNA_LOG_LEVEL=WARNING, or PYTHONPATH=/elsewhere/src to try a changed copy).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QNA_", "OPENAI_", "PROMETHEUS_")) and k != "DATABASE_URL"
    }
    env.update(
        DATABASE_URL=database_url,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY="x",
        QNA_MODEL=MODEL,
    )
    if qna is None:
        return env
    env.update(qna)
    for assignment in shlex.split(os.environ.get("BENCH_QNA_ENV", "")):
        key, _, value = assignment.partition("=")
        env[key] = value
    return env


def start_qna(
    children: Children,
    plan: Plan,
    *,
    name: str,
    database_url: str,
    fake: Fake,
    cwd: Path,
    cache_ttl_s: float = 0.0,
    settings: dict[str, str] | None = None,
) -> Server:
    port = free_port()
    argv = [
        str(BIN / "qna"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(plan.workers),
        *plan.serve_args,
    ]
    env = server_env(database_url, fake, {"QNA_CACHE_TTL": f"{cache_ttl_s:g}", **(settings or {})})
    proc = children.spawn(name, argv, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", proc, name)
    return Server(name, url, proc)


def start_baseline(children: Children, *, database_url: str, fake: Fake, cwd: Path) -> Server:
    name = "baseline"
    env = server_env(database_url, fake)
    setup = subprocess.run(
        [sys.executable, str(BENCH / "baseline_app.py")],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if setup.returncode != 0:
        raise BenchError(f"baseline_app.py could not create its table:\n{setup.stderr}")
    port = free_port()
    argv = [
        str(BIN / "gunicorn"),
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "--chdir",
        str(BENCH),
        "--backlog",
        "2048",
        "baseline_app:app",
    ]
    proc = children.spawn(name, argv, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc, name)
    return Server(name, url, proc)


# -- databases -----------------------------------------------------------------------------


def database_url(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    scheme = "postgresql" if parts.scheme.startswith("postgres") else parts.scheme
    return urlunsplit(parts._replace(scheme=scheme, path=f"/{name}"))


class Databases:
    """Fresh databases for one run, dropped at exit. Their names also go to
    $BENCH_DBFILE, for bench/run's trap."""

    def __init__(self, admin_url: str, dbfile: str | None) -> None:
        self._admin_url = database_url(admin_url, urlsplit(admin_url).path.lstrip("/"))
        self._names: list[str] = []
        self._dbfile = Path(dbfile) if dbfile else None

    def _admin(self, sql: str) -> None:
        conn = psycopg2.connect(self._admin_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create(self, name: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(name)
        if self._dbfile is not None:
            with self._dbfile.open("a") as f:
                f.write(f"{name}\n")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin(f'CREATE DATABASE "{name}"')
        self._names.append(name)
        return database_url(self._admin_url, name)

    def drop_all(self) -> None:
        for name in self._names:
            try:
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg2.Error as exc:
                print(f"bench: could not drop database {name}: {exc}", file=sys.stderr)
        self._names.clear()


@dataclass(frozen=True)
class Counts:
    answered: int
    pending: int = 0
    failed: int = 0
    cached: int = 0


class RowCounter(Protocol):
    def counts(self) -> Counts: ...


class QnaRows:
    """Rows of qna's own table, by status."""

    def __init__(self, url: str) -> None:
        self._conn = psycopg2.connect(url)
        self._conn.autocommit = True

    def counts(self) -> Counts:
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FILTER (WHERE status = 'answered'),"
                " count(*) FILTER (WHERE status = 'pending'),"
                " count(*) FILTER (WHERE status = 'failed'),"
                " count(*) FILTER (WHERE status = 'answered' AND source_id IS NOT NULL)"
                " FROM qn_a"
            )
            row = cur.fetchone()
        assert row is not None
        return Counts(*(int(v) for v in row))

    def close(self) -> None:
        self._conn.close()


class BaselineRows:
    """The baseline writes a row only once answered."""

    def __init__(self, url: str) -> None:
        self._conn = psycopg2.connect(url)
        self._conn.autocommit = True

    def counts(self) -> Counts:
        with self._conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM qn_a")
            row = cur.fetchone()
        assert row is not None
        return Counts(int(row[0]))

    def close(self) -> None:
        self._conn.close()


def settle(rows: RowCounter, expected: int, timeout: float) -> Counts:
    """Wait until `expected` answered rows are there and none is pending, then a little
    longer, so that a duplicate write would be seen too."""
    deadline = time.monotonic() + timeout
    while True:
        counts = rows.counts()
        if counts.answered >= expected and counts.pending == 0:
            break
        if time.monotonic() > deadline:
            return counts
        time.sleep(0.05)
    time.sleep(0.3)
    return rows.counts()


# -- measuring -----------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may itself hold spaces and parentheses.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:
        tree.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ServerSampler:
    """While the block runs: the largest total RSS of a server and its descendants (its
    workers), sampled a few times a second, and the CPU time they used."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self.max_kib = 0
        self.cpu_s = 0.0

    def _sample(self) -> list[int]:
        pids = process_tree(self._root)
        self.max_kib = max(self.max_kib, sum(rss_kib(pid) for pid in pids))
        return pids

    def _cpu(self, pids: list[int]) -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    @contextmanager
    def running(self) -> Iterator[ServerSampler]:
        pids = self._sample()
        cpu_before = self._cpu(pids)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            # The same processes: a worker that died during the run would take its
            # CPU time with it, and one started since would bring time from before.
            self.cpu_s = self._cpu(pids) - cpu_before
            self._sample()

    @property
    def max_mb(self) -> float:
        return self.max_kib / 1024


@dataclass(frozen=True)
class WrkResult:
    requests: int
    ok: int
    non_2xx: int
    socket_errors: dict[str, int]
    in_flight: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    @property
    def rate(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def describe_errors(self) -> str:
        kinds = {k: v for k, v in self.socket_errors.items() if v}
        kinds.update({f"HTTP {k}": v for k, v in self.statuses.items() if not k.startswith("2")})
        return ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))


def run_wrk(
    children: Children, url: str, load: Load, *, duration_s: float, mode: str, tag: str
) -> WrkResult:
    argv = [
        "wrk",
        "-t",
        str(load.threads),
        "-c",
        str(load.clients),
        "-d",
        f"{max(1, round(duration_s))}s",
        "--timeout",
        f"{WRK_TIMEOUT_S}s",
        "-s",
        str(BENCH / "ask.lua"),
        url,
        "--",
        mode,
        tag,
    ]
    proc = children.spawn("wrk", argv, stdout_pipe=True)
    try:
        out, _ = proc.communicate(timeout=duration_s + WRK_TIMEOUT_S + 30)
    finally:
        children.stop(proc)
    text = out.decode(errors="replace")
    found = re.search(r"^BENCH_JSON (.*)$", text, re.MULTILINE)
    if proc.returncode != 0 or found is None:
        raise BenchError(f"wrk failed ({proc.returncode}) on {url}:\n{text}\n{log_tail('wrk')}")
    data = json.loads(found.group(1))
    statuses = {str(k): int(v) for k, v in data["statuses"].items()}
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    errors = data["errors"]
    latency = data["latency_us"]
    return WrkResult(
        requests=int(data["requests"]),
        ok=ok,
        non_2xx=int(data["received"]) - ok,
        socket_errors={k: int(errors[k]) for k in ("connect", "read", "write", "timeout")},
        # wrk calls request() once before the run to check the script (so one "sent" never
        # went out); and the response that ends a connection's run is not followed by a
        # new request. What remains was sent and never read: the server still answers it.
        in_flight=max(0, int(data["sent"]) - int(data["received"]) - 1),
        duration_s=int(data["duration_us"]) / 1e6,
        p50_ms=int(latency["p50"]) / 1000,
        p99_ms=int(latency["p99"]) / 1000,
        statuses=statuses,
    )


@dataclass
class RowCheck:
    delta: int
    expected: int
    ok_responses: int
    in_flight: int
    failed_delta: int
    cached_delta: int | None = None

    @property
    def ok(self) -> bool:
        return self.delta == self.expected and self.failed_delta == 0

    def describe(self) -> str:
        word = "ok" if self.ok else "MISMATCH"
        text = f"{word}: {self.delta:+d} rows = {self.ok_responses} 2xx + {self.in_flight} cut off"
        if not self.ok:
            text = f"MISMATCH: {self.delta:+d} rows, expected {self.ok_responses} 2xx"
            text += f" + {self.in_flight} cut off"
        if self.failed_delta:
            text += f", {self.failed_delta} failed rows"
        return text


@dataclass
class Result:
    load: Load
    system: str
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int | None
    error_detail: str = ""
    rss_mb: float | None = None
    #: CPU time of the server's processes per answered ask.
    cpu_ms: float | None = None
    rows: RowCheck | None = None
    llm_calls: int | None = None
    samples: int = 0

    def summary(self) -> str:
        text = (
            f"   {self.load.title:<26} {self.system:<14} {self.rate:8.1f}/s"
            f"  p50 {self.p50_ms:8.2f} ms  p99 {self.p99_ms:8.2f} ms"
            f"  errors {self.errors}  cpu {_num(self.cpu_ms, 2)} ms/answer"
        )
        if self.rows is not None:
            text += f"  rows {self.rows.describe()}"
        if self.llm_calls is not None:
            text += f"  LLM calls {self.llm_calls}"
        return text

    @property
    def broken(self) -> list[str]:
        problems = []
        if self.samples == 0:
            problems.append("no response at all during the run")
        if self.errors:
            problems.append(f"{self.errors} errors ({self.error_detail})")
        if self.rows is not None and not self.rows.ok:
            problems.append(self.rows.describe())
        if self.load.mode == "same" and self.llm_calls:
            problems.append(f"{self.llm_calls} LLM calls on cache hits")
        return [f"{self.load.title}, {self.system}: {p}" for p in problems]


class Bench:
    def __init__(self, plan: Plan, children: Children, run_id: str) -> None:
        self.plan = plan
        self.children = children
        self.run_id = run_id
        self.results: list[Result] = []
        #: How long the first ask to a fresh server took, by system.
        self.first_ask_ms: dict[str, float] = {}

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def measure(
        self,
        system: str,
        server: Server,
        load: Load,
        *,
        path: str = "/ask",
        mode: str | None = None,
        rows: RowCounter | None = None,
        fake: Fake | None = None,
        tag: str | None = None,
    ) -> Result:
        mode = mode or load.mode
        tag = tag or re.sub(r"[^a-z0-9]+", "-", f"{self.run_id}-{system}-{load.key}".lower())
        url = server.url.rstrip("/") + path
        drain_s = load.llm_latency_s + 15
        before = rows.counts() if rows else None
        warm = run_wrk(
            self.children, url, load, duration_s=load.warmup_s, mode=mode, tag=f"{tag}-warm"
        )
        if rows is not None and before is not None:
            before = settle(rows, before.answered + warm.ok + warm.in_flight, drain_s)
        calls_before = fake.calls() if fake else None
        with ServerSampler(server.proc.pid).running() as sampler:
            run = run_wrk(self.children, url, load, duration_s=load.duration_s, mode=mode, tag=tag)
        check = None
        if rows is not None and before is not None:
            expected = before.answered + run.ok + run.in_flight
            after = settle(rows, expected, drain_s)
            check = RowCheck(
                delta=after.answered - before.answered,
                expected=run.ok + run.in_flight,
                ok_responses=run.ok,
                in_flight=run.in_flight,
                failed_delta=after.failed - before.failed,
                cached_delta=after.cached - before.cached,
            )
        calls = fake.calls() - calls_before if fake and calls_before is not None else None
        result = Result(
            load=load,
            system=system,
            rate=run.rate,
            p50_ms=run.p50_ms,
            p99_ms=run.p99_ms,
            errors=run.errors,
            error_detail=run.describe_errors(),
            rss_mb=sampler.max_mb,
            cpu_ms=sampler.cpu_s * 1000 / run.ok if run.ok else None,
            rows=check,
            llm_calls=calls,
            samples=run.requests,
        )
        self.results.append(result)
        self.say(result.summary())
        return result

    def warm_up(self, system: str, server: Server, rows: RowCounter, llm_latency_s: float) -> None:
        """Time the first ask of a fresh server, then load it with a few connections, so
        every worker has answered before a scenario measures it (a worker's first ask
        pays for imports and connections)."""
        tag = re.sub(r"[^a-z0-9]+", "-", f"{self.run_id}-{system}-boot".lower())
        started = time.perf_counter()
        status, body = http_json(f"{server.url}/ask", {"question": f"{QUESTION} ({tag})"})
        self.first_ask_ms[system] = (time.perf_counter() - started) * 1000
        if status not in (200, 201):
            raise BenchError(f"the first ask to {system} failed: HTTP {status} {body}")
        before = rows.counts()
        load = Load("boot", "warm-up", 4 * self.plan.workers, llm_latency_s, 0, 0)
        warm = run_wrk(
            self.children,
            f"{server.url}/ask",
            load,
            duration_s=self.plan.latency.warmup_s,
            mode="ask",
            tag=f"{tag}-warm",
        )
        settle(rows, before.answered + warm.ok + warm.in_flight, llm_latency_s + 15)
        self.say(
            f"   {system}: first ask {self.first_ask_ms[system]:.0f} ms; "
            f"warm-up {warm.ok} asks on {load.clients} connections"
        )

    def sdk_floor(self, fake: Fake, load: Load) -> Result:
        """The bare SDK call under the same concurrency, in as many processes as qna
        has workers (one for a single client), with nothing else around it."""
        procs = 1 if load.clients == 1 else self.plan.workers
        threads = math.ceil(load.clients / procs)
        argv = [
            sys.executable,
            str(BENCH / "sdk_floor.py"),
            "--base-url",
            fake.base_url,
            "--threads",
            str(threads),
            "--duration",
            str(load.duration_s),
            "--warmup",
            str(load.warmup_s),
        ]
        running = [self.children.spawn("sdk-floor", argv, stdout_pipe=True) for _ in range(procs)]
        outputs = []
        try:
            for proc in running:
                out, _ = proc.communicate(timeout=load.duration_s + load.warmup_s + 60)
                if proc.returncode != 0 or not out.strip():
                    raise BenchError(
                        f"sdk_floor.py failed ({proc.returncode}):\n{log_tail('sdk-floor')}"
                    )
                outputs.append(json.loads(out))
        finally:
            for proc in running:
                self.children.stop(proc)
        samples = sorted(ms for o in outputs for ms in o["latencies_ms"])
        calls = len(samples)
        errors = sum(int(o["error_count"]) for o in outputs)
        system = "bare SDK" if procs == 1 else f"bare SDK {procs}x{threads} threads"
        result = Result(
            load=load,
            system=system,
            rate=calls / max(float(o["wall_s"]) for o in outputs),
            p50_ms=percentile(samples, 50),
            p99_ms=percentile(samples, 99),
            errors=errors,
            error_detail="; ".join(e for o in outputs for e in o["errors"])[:200],
            cpu_ms=sum(float(o["cpu_s"]) for o in outputs) * 1000 / calls if calls else None,
            samples=calls,
        )
        self.results.append(result)
        self.say(result.summary())
        return result

    def measure_qna(
        self,
        fake: Fake,
        loads: Sequence[Load],
        database_url: str,
        rows: RowCounter,
        workdir: Path,
    ) -> None:
        """Each configuration of QNA_SYSTEMS, on a fresh server, under `loads` (which
        share `fake`'s LLM latency)."""
        plan = self.plan
        latency = loads[0].llm_latency_s
        slow = " (slow LLM)" if latency else ""
        serve = "qna serve " + shlex.join(["--workers", str(plan.workers), *plan.serve_args])
        for system, settings in QNA_SYSTEMS:
            self.say(f"== {serve}, {settings or 'default settings'}{slow}")
            server = start_qna(
                self.children,
                plan,
                name=_slug(system + slow),
                database_url=database_url,
                fake=fake,
                cwd=workdir,
                settings=settings,
            )
            self.warm_up(system + slow, server, rows, latency)
            for load in loads:
                self.measure(system, server, load, rows=rows)
            self.children.stop(server.proc)

    def run(self, databases: Databases, workdir: Path) -> None:
        plan = self.plan
        qna_db = databases.create(f"qna_bench_{self.run_id}")
        baseline_db = databases.create(f"qna_bench_{self.run_id}_baseline")
        stop = self.children.stop

        self.say("== fake LLM at 0 ms: alone, and the bare SDK call (the floor)")
        fake0 = start_fake(self.children, 0.0)
        for load in (plan.latency, plan.saturation):
            self.measure("fake LLM alone", fake0, load, path="/chat/completions", mode="llm")
            self.sdk_floor(fake0, load)

        self.say("== baseline: Flask + Flask-SQLAlchemy under gunicorn -w 2 (sync)")
        baseline = start_baseline(self.children, database_url=baseline_db, fake=fake0, cwd=workdir)
        baseline_rows = BaselineRows(baseline_db)
        try:
            self.warm_up("baseline", baseline, baseline_rows, 0.0)
            for load in (plan.latency, plan.saturation):
                self.measure("baseline", baseline, load, rows=baseline_rows)
        finally:
            baseline_rows.close()
            stop(baseline.proc)

        qna_rows = QnaRows(qna_db)
        try:
            self.measure_qna(fake0, (plan.latency, plan.saturation), qna_db, qna_rows, workdir)

            self.say("== qna serve with QNA_CACHE_TTL=3600: one question, asked again and again")
            cached = start_qna(
                self.children,
                plan,
                name="qna-serve-cache",
                database_url=qna_db,
                fake=fake0,
                cwd=workdir,
                cache_ttl_s=3600,
            )
            self.warm_up("qna (cache)", cached, qna_rows, 0.0)
            tag = f"{self.run_id}-cache"
            status, body = http_json(f"{cached.url}/ask", {"question": f"{QUESTION} ({tag})"})
            if status != 201 or body.get("status") != "answered":
                raise BenchError(f"the priming ask failed: HTTP {status} {body}")
            self.measure("qna (cache)", cached, plan.cache, rows=qna_rows, fake=fake0, tag=tag)
            stop(cached.proc)
            stop(fake0.proc)

            slow = plan.concurrency
            self.say(f"== fake LLM at {slow.llm}")
            fake1 = start_fake(self.children, slow.llm_latency_s)
            self.measure("fake LLM alone", fake1, slow, path="/chat/completions", mode="llm")
            self.sdk_floor(fake1, slow)
            self.measure_qna(fake1, (slow,), qna_db, qna_rows, workdir)
            stop(fake1.proc)
        finally:
            qna_rows.close()


def _slug(system: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", system.lower()).strip("-")


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- report --------------------------------------------------------------------------------


@dataclass
class Target:
    text: str
    measured: str
    met: bool | None  # None: could not be measured


@dataclass
class Report:
    plan: Plan
    results: list[Result]
    machine: list[tuple[str, str]] = field(default_factory=list)
    first_ask_ms: dict[str, float] = field(default_factory=dict)

    def find(self, load: Load, system: str) -> Result | None:
        for r in self.results:
            if r.load == load and r.system == system:
                return r
        return None

    def floor(self, load: Load) -> str:
        for r in self.results:
            if r.load == load and r.system.startswith("bare SDK"):
                return f" (the bare SDK alone: {r.rate:.0f}/s, p99 {r.p99_ms:.0f} ms)"
        return ""

    def targets(self) -> list[Target]:
        out = []
        for system, _ in QNA_SYSTEMS:
            out += self.system_targets(system)
        return out + self.cache_targets()

    def system_targets(self, system: str) -> list[Target]:
        plan, out = self.plan, []
        sdk, qna1 = self.find(plan.latency, "bare SDK"), self.find(plan.latency, system)
        if sdk and qna1:
            limit = sdk.p50_ms + 1.0
            out.append(
                Target(
                    f"{plan.latency.title}: {system} p50 ≤ bare SDK p50 + 1.0 ms ({limit:.2f} ms)",
                    f"{qna1.p50_ms:.2f} ms (+{qna1.p50_ms - sdk.p50_ms:.2f} ms)",
                    qna1.samples > 0 and qna1.p50_ms <= limit,
                )
            )
        base, qna50 = self.find(plan.saturation, "baseline"), self.find(plan.saturation, system)
        if base and qna50:
            ratio = qna50.rate / base.rate if base.rate else math.inf
            out.append(
                Target(
                    f"{plan.saturation.title}: {system} answered/s ≥ 1.5x baseline, 0 errors",
                    f"{qna50.rate:.0f}/s vs {base.rate:.0f}/s = {ratio:.2f}x, "
                    f"{qna50.errors} errors{self.floor(plan.saturation)}",
                    ratio >= 1.5 and qna50.errors == 0,
                )
            )
        slow = plan.concurrency
        qs = self.find(slow, system)
        if qs:
            need = 0.9 * slow.clients / slow.llm_latency_s
            p99_limit = 1.5 * slow.llm_latency_s * 1000
            rss = qs.rss_mb or 0.0
            out.append(
                Target(
                    f"{slow.title}: {system} ≥ {need:.0f} answered/s, 0 errors, "
                    f"p99 ≤ {p99_limit:.0f} ms, RSS ≤ {RSS_TARGET_MB:.0f} MB",
                    f"{qs.rate:.0f}/s, {qs.errors} errors, p99 {qs.p99_ms:.0f} ms, "
                    f"RSS {rss:.0f} MB{self.floor(slow)}",
                    qs.rate >= need
                    and qs.errors == 0
                    and qs.p99_ms <= p99_limit
                    and rss <= RSS_TARGET_MB,
                )
            )
        return out

    def cache_targets(self) -> list[Target]:
        plan, out = self.plan, []
        qc = self.find(plan.cache, "qna (cache)")
        if qc:
            out.append(
                Target(
                    f"{plan.cache.title}: p50 ≤ 2 ms, 0 LLM calls",
                    f"p50 {qc.p50_ms:.2f} ms, {qc.llm_calls} LLM calls",
                    qc.samples > 0 and qc.p50_ms <= 2.0 and qc.llm_calls == 0,
                )
            )
        return out

    def broken(self) -> list[str]:
        return [p for r in self.results for p in r.broken]

    def markdown(self) -> str:
        lines = [
            f"# qna bench{' (smoke)' if self.plan.smoke else ''}",
            "",
            *(f"- {k}: {v}" for k, v in self.machine),
            "",
            "| Scenario | System | Answered/s | p50 ms | p99 ms | Errors | Server RSS MB | "
            "CPU ms/answer | DB rows |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.results:
            errors = "" if r.errors is None else str(r.errors)
            if r.error_detail:
                errors += f" ({r.error_detail})"
            rows = r.rows.describe() if r.rows else ""
            if r.llm_calls is not None:
                cached = r.rows.cached_delta if r.rows else None
                rows += f"; LLM calls {r.llm_calls}; cached rows {cached}"
            lines.append(
                f"| {r.load.title} | {r.system} | {r.rate:.1f} | {r.p50_ms:.2f} | "
                f"{r.p99_ms:.2f} | {errors} | {_num(r.rss_mb, 0)} | {_num(r.cpu_ms, 2)} | "
                f"{rows} |"
            )
        headroom = []
        for load in (self.plan.latency, self.plan.saturation, self.plan.concurrency):
            fake = self.find(load, "fake LLM alone")
            qna = self.find(load, QNA_SYSTEMS[-1][0]) or self.find(load, "qna")
            if fake is None or qna is None or not qna.rate:
                continue
            warn = " (**the fake may be the bottleneck**)"
            if load.llm_latency_s:
                # Here the load is bound by the latency: the fake must just keep to it.
                slack = fake.p50_ms - load.llm_latency_s * 1000
                note = "" if slack <= 0.1 * load.llm_latency_s * 1000 + 20 else warn
                headroom.append(
                    f"{load.title}: {fake.rate:.0f}/s, p50 {fake.p50_ms:.0f} ms, "
                    f"p99 {fake.p99_ms:.0f} ms{note}"
                )
            else:
                ratio = fake.rate / qna.rate
                note = "" if ratio >= 2 else warn
                headroom.append(
                    f"{load.title}: {fake.rate:.0f}/s, {ratio:.1f}x {qna.system}'s{note}"
                )
        if headroom:
            lines += ["", "The fake LLM alone, same load: " + "; ".join(headroom) + "."]
        if self.first_ask_ms:
            firsts = ", ".join(f"{k} {v:.0f} ms" for k, v in self.first_ask_ms.items())
            lines += ["", f"First ask to a freshly started server (a cold worker): {firsts}."]
        lines += ["", "| Target | Measured | |", "| --- | --- | --- |"]
        for t in self.targets():
            verdict = "n/a" if t.met is None else ("PASS" if t.met else "MISS")
            lines.append(f"| {t.text} | {t.measured} | **{verdict}** |")
        broken = self.broken()
        lines += [
            "",
            "Broken: " + ("; ".join(broken) if broken else "nothing (no errors, rows match)"),
        ]
        return "\n".join(lines) + "\n"


def machine_info(plan: Plan) -> list[tuple[str, str]]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    wrk_version = (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("openai SDK", openai.__version__),
        ("wrk", wrk_version.split(" Copyright")[0]),
        ("load average at start", load),
        (
            "qna serve",
            shlex.join(["--workers", str(plan.workers), *plan.serve_args])
            + (f", {os.environ['BENCH_QNA_ENV']}" if os.environ.get("BENCH_QNA_ENV") else ""),
        ),
        ("mode", "smoke" if plan.smoke else "full"),
    ]


# -- main ----------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark qna serve (see bench/bench.py).")
    parser.add_argument("--smoke", action="store_true", help="a few seconds per scenario")
    args = parser.parse_args(argv)
    admin_url = os.environ.get("BENCH_ADMIN_DATABASE_URL") or os.environ.get(
        "QNA_TEST_DATABASE_URL"
    )
    if not admin_url:
        print("bench: set QNA_TEST_DATABASE_URL (bash bench/run does).", file=sys.stderr)
        return 2
    plan = Plan.make(
        smoke=args.smoke,
        workers=env_int("BENCH_WORKERS", 2),
        serve_args=shlex.split(os.environ.get("BENCH_QNA_ARGS", "")),
    )
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    RESULTS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.glob("*.log"):
        old.unlink()
    run_id = f"{os.getpid()}_{int(time.time())}"
    children = Children(os.environ.get("BENCH_PIDFILE"))
    databases = Databases(admin_url, os.environ.get("BENCH_DBFILE"))
    machine = machine_info(plan)
    bench = Bench(plan, children, run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="qna-bench-") as workdir:
            bench.run(databases, Path(workdir))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        # A second Ctrl-C or bench/run's TERM must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop_all()
        databases.drop_all()
    machine.append(("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    report = Report(plan, bench.results, machine, bench.first_ask_ms)
    text = report.markdown()
    (RESULTS / "latest.md").write_text(text)
    print()
    print(text, end="")
    print(f"\n(written to {(RESULTS / 'latest.md').relative_to(REPO)}; logs in bench/results/logs)")
    return 1 if report.broken() else 0


if __name__ == "__main__":
    sys.exit(main())
