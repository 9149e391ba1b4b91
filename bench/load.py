"""Mixed, bounded load on the native stack (``flywheel.stack``: the API and a Celery worker
as processes on a real PostgreSQL and Redis).

Clients (a fixed number, each one request at a time: the load is bounded) pick operations
by weight: single feedback events, batches of 50, signal pages, and review claims (claim,
then release). Each event id acknowledged by the API (201 / 200, or ``created`` /
``duplicate`` in a batch) is remembered; at the end the stored events are counted, and
``lost`` is acknowledged minus stored (goal 0). A baseline with one client runs first, in
the same run; the ratio of the mixed load's throughput to it closes the table.

    python bench/load.py --quick     # under 45 s
    python bench/load.py             # 60 s of load
    python bench/load.py --quick --rate-limit 100000/minute   # with per-key limits counted
                                                              # in Redis (none reached)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import quantiles
from typing import Any

# bench/retrieval.py would shadow the `retrieval` package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine

from bench.ingest import scratch_database
from flywheel.auth.service import create_api_key
from flywheel.db import migrate
from flywheel.db.engine import session_factory
from flywheel.db.models import ReviewKind, Scope
from flywheel.review import repository
from flywheel.settings import Settings
from flywheel.stack import StackConfig, native_stack

REDIS = "redis://127.0.0.1:6379/13"
WEIGHTS = {"feedback": 6, "feedback_batch": 1, "signals": 3, "review_claim": 1}
BATCH = 50


@dataclass(kw_only=True, slots=True)
class Tally:
    """What one phase did."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    acknowledged: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def operations(self) -> int:
        return sum(len(v) for v in self.latencies.values())


def _event(event_id: str, rng: random.Random) -> dict[str, Any]:
    return {
        "kind": "thumbs",
        "event_id": event_id,
        "prompt": f"a {rng.choice(['red', 'blue', 'purple'])} square",
        "image": {"uri": f"s3://bench/{event_id}.png"},
        "model_version": "bench",
        "value": rng.choice(["up", "down"]),
    }


async def _client(
    number: int,
    *,
    base: str,
    keys: dict[str, dict[str, str]],
    until: float,
    run: str,
    tally: Tally,
) -> None:
    rng = random.Random(number)
    names, weights = zip(*WEIGHTS.items(), strict=True)
    counter = 0
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while time.monotonic() < until:
            operation = rng.choices(names, weights)[0]
            started = time.perf_counter()
            try:
                if operation == "feedback":
                    counter += 1
                    event_id = f"{run}-{number}-{counter}"
                    reply = await http.post(
                        "/v1/feedback", json=_event(event_id, rng), headers=keys["ingest"]
                    )
                    if reply.status_code in (200, 201):
                        tally.acknowledged.add(event_id)
                elif operation == "feedback_batch":
                    events = []
                    for _ in range(BATCH):
                        counter += 1
                        events.append(_event(f"{run}-{number}-{counter}", rng))
                    reply = await http.post(
                        "/v1/feedback/batch", json={"events": events}, headers=keys["ingest"]
                    )
                    if reply.status_code == 207:
                        for item in reply.json()["results"]:
                            if item["status"] in ("created", "duplicate"):
                                tally.acknowledged.add(item["event_id"])
                elif operation == "signals":
                    reply = await http.get(
                        "/v1/signals", params={"limit": 100}, headers=keys["read"]
                    )
                else:
                    reply = await http.post(
                        "/v1/review/claim", json={"lease_seconds": 60}, headers=keys["review"]
                    )
                    if reply.status_code == 200:
                        item = reply.json()["id"]
                        await http.post(f"/v1/review/items/{item}/release", headers=keys["review"])
            except httpx.HTTPError:
                tally.errors[operation] += 1
                continue
            tally.latencies[operation].append(time.perf_counter() - started)
            if reply.status_code >= 400:
                tally.errors[operation] += 1


async def _phase(
    base: str, keys: dict[str, dict[str, str]], *, clients: int, seconds: float, run: str
) -> Tally:
    tally = Tally()
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(
        *(
            _client(n, base=base, keys=keys, until=until, run=run, tally=tally)
            for n in range(clients)
        )
    )
    tally.seconds = time.monotonic() - started
    return tally


def _prepare(url: str, reviewers: int) -> dict[str, dict[str, str]]:
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
        with session_factory(engine)() as session:
            keys = {
                "ingest": create_api_key(session, app="bench-app", scopes=[Scope.INGEST]),
                "read": create_api_key(session, app="bench-app", scopes=[Scope.READ]),
                "review": create_api_key(session, app="bench-reviewer", scopes=[Scope.REVIEW]),
            }
            for k in range(reviewers):
                repository.add_item(
                    session,
                    kind=ReviewKind.AUGMENTATION_BATCH,
                    title=f"bench batch {k}",
                    artefact={"k": k},
                    actor="bench",
                )
            session.commit()
        return {name: {"Authorization": f"Bearer {k.secret}"} for name, k in keys.items()}
    finally:
        engine.dispose()


def _stored(conninfo: str, run: str) -> set[str]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT event_id FROM signals WHERE event_id LIKE %s", (run + "-%",)
        ).fetchall()
    return {row[0] for row in rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under 45 s")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--rate-limit",
        default="off",
        help="FLYWHEEL_RATE_LIMIT of the API (default off: the bench measures capacity; a "
        "limit no client reaches measures what counting in Redis costs)",
    )
    args = parser.parse_args(argv)
    baseline_s, load_s = (3.0, 10.0) if args.quick else (15.0, 60.0)
    console = Console()
    with scratch_database() as db, tempfile.TemporaryDirectory() as tmp:
        keys = _prepare(db.url, reviewers=50)
        settings = Settings(
            database_url=db.url,
            redis_url=REDIS,
            home=Path(tmp) / "home",
            rate_limit=args.rate_limit,
        )
        config = StackConfig(log_dir=Path(tmp) / "logs", api_workers=2, prefect=False)
        with native_stack(settings, config) as stack:
            console.print(
                f"stack: api {stack.api_url} + Celery worker on {db.origin}; "
                f"rate limit {settings.rate_limit}"
            )
            base_run, load_run = f"b{secrets.token_hex(3)}", f"l{secrets.token_hex(3)}"
            baseline = asyncio.run(
                _phase(stack.api_url, keys, clients=1, seconds=baseline_s, run=base_run)
            )
            loaded = asyncio.run(
                _phase(stack.api_url, keys, clients=args.clients, seconds=load_s, run=load_run)
            )
        stored = _stored(db.conninfo, base_run) | _stored(db.conninfo, load_run)
    table = Table(title=f"mixed load: {args.clients} clients, {load_s:g} s")
    for column in ("operation", "requests", "errors", "per s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for operation in WEIGHTS:
        latencies = sorted(loaded.latencies.get(operation, []))
        if len(latencies) >= 2:
            cuts = quantiles(latencies, n=100)
            p50, p99 = cuts[49] * 1000, cuts[98] * 1000
        else:
            p50 = p99 = float("nan")
        table.add_row(
            operation,
            str(len(latencies)),
            str(loaded.errors.get(operation, 0)),
            f"{len(latencies) / loaded.seconds:.1f}",
            f"{p50:.1f}",
            f"{p99:.1f}",
        )
    console.print(table)
    base_rate = baseline.operations() / baseline.seconds
    load_rate = loaded.operations() / loaded.seconds
    events = len(baseline.acknowledged | loaded.acknowledged)
    console.print(
        f"throughput {load_rate:.1f} ops/s with {args.clients} clients vs {base_rate:.1f} with "
        f"one (baseline, same run): x{load_rate / base_rate:.2f}; {events} events acknowledged"
    )
    lost = len((baseline.acknowledged | loaded.acknowledged) - stored)
    print(f"lost: {lost}")


if __name__ == "__main__":
    main()
