"""``flywheel demo``: the embedded default end to end, through the real API.

For now the demo covers the signal store: it starts (or joins) the database, migrates,
creates a demo API key, serves the API on a loopback port, ingests seeded sample
signals of every kind with single and batch requests plus an evaluation run, replays a
few events to show idempotency, reads everything back page by page and prints a summary.
"""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from flywheel.api.app import create_app
from flywheel.auth.service import create_api_key
from flywheel.db import migrate
from flywheel.db.engine import create_db_engine, database_url, session_factory
from flywheel.db.models import Scope
from flywheel.settings import Settings

DEMO_APP = "demo-app"
MODEL_VERSION = "base-v0"

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
_SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
_WORDS = ["OPEN", "SALE", "CAFE", "EXIT", "HELLO", "你好", "出口"]
_FLAGS = ["text_wrong", "artifact", "ignored_instruction", "wrong_count", "wrong_color", "other"]


@dataclass(frozen=True, slots=True)
class _Sample:
    prompt: str
    skill: str


def _sample(rng: random.Random) -> _Sample:
    match rng.randrange(3):
        case 0:
            n = rng.randint(1, 5)
            return _Sample(
                f"{n} {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}s on a white canvas", "count"
            )
        case 1:
            word = rng.choice(_WORDS)
            return _Sample(f"a shop sign that reads '{word}'", "text")
        case _:
            a, b = rng.sample(_SHAPES, 2)
            return _Sample(f"a {rng.choice(_COLOURS)} {a} left of a {b}", "relation")


def _feedback_event(rng: random.Random, run: str, index: int) -> dict[str, Any]:
    sample = _sample(rng)
    event: dict[str, Any] = {
        "event_id": f"{run}-fb-{index:06d}",
        "prompt": sample.prompt,
        "image": {"uri": f"file://demo/{run}/{index:06d}.png"},
        "model_version": MODEL_VERSION,
        "user_id": f"user-{rng.randrange(40)}",
        "session_id": f"session-{rng.randrange(120)}",
    }
    kind = rng.choices(["thumbs", "rating", "pairwise", "comment", "flags"], [5, 3, 2, 1, 2])[0]
    event["kind"] = kind
    match kind:
        case "thumbs":
            event["value"] = rng.choice(["up", "down"])
        case "rating":
            event["value"] = rng.randint(1, 5)
        case "pairwise":
            event.pop("image")
            event["chosen"] = {"uri": f"file://demo/{run}/{index:06d}-a.png"}
            event["rejected"] = {"uri": f"file://demo/{run}/{index:06d}-b.png"}
        case "comment":
            event["text"] = rng.choice(
                ["letters are garbled", "looks great", "wrong number of objects"]
            )
        case "flags":
            event["flags"] = rng.sample(_FLAGS, rng.randint(1, 2))
    return event


def _evaluation_run(rng: random.Random, run: str, samples: int) -> dict[str, Any]:
    items = []
    for index in range(samples):
        sample = _sample(rng)
        score = round(rng.random(), 3)
        items.append(
            {
                "sample_id": f"{sample.skill}-{index:04d}",
                "prompt": sample.prompt,
                "image": {"uri": f"file://demo/{run}/eval-{index:04d}.png"},
                "skill": sample.skill,
                "scores": {sample.skill: score},
                "passed": score >= 0.5,
            }
        )
    return {
        "run_id": f"{run}-eval",
        "benchmark": "demo-suite",
        "model_version": MODEL_VERSION,
        "samples": items,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _BackgroundServer:
    """uvicorn serving the real app on a loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.port = _free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo API server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_demo(settings: Settings, *, events: int, seed: int, console: Console) -> dict[str, Any]:
    """Run the demo; returns the summary it prints."""
    started = time.perf_counter()
    embedded = settings.database_url is None
    url = database_url(settings)
    settings = settings.model_copy(update={"database_url": url})
    console.print(
        "[bold]database[/]: "
        + (
            f"embedded PostgreSQL under {settings.pgdata_path}"
            if embedded
            else "FLYWHEEL_DATABASE_URL"
        )
    )
    engine = create_db_engine(settings, pool_size=2)
    migrate.upgrade(engine)
    console.print(f"[bold]schema[/]: migrated to {migrate.current_revision(engine)}")
    with session_factory(engine)() as session:
        key = create_api_key(session, app=DEMO_APP, scopes=[Scope.INGEST, Scope.READ])
        session.commit()
    engine.dispose()
    console.print(f"[bold]api key[/]: {key.record.prefix} for app {DEMO_APP!r} (ingest, read)")

    rng = random.Random(seed)
    run = f"demo-{uuid.uuid4().hex[:8]}"
    feedback = [_feedback_event(rng, run, i) for i in range(events)]
    evaluation = _evaluation_run(rng, run, samples=64)
    singles, batched = feedback[: min(20, events)], feedback[min(20, events) :]
    statuses: Counter[str] = Counter()

    with (
        _BackgroundServer(settings) as base_url,
        httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key.secret}"}, timeout=30
        ) as client,
    ):
        console.print(f"[bold]api[/]: serving on {base_url}")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("ingesting", total=len(feedback) + 1)
            for event in singles:
                reply = client.post("/v1/feedback", json=event)
                reply.raise_for_status()
                statuses["created" if reply.status_code == 201 else "duplicate"] += 1
                progress.advance(task)
            for start in range(0, len(batched), 500):
                chunk = batched[start : start + 500]
                reply = client.post("/v1/feedback/batch", json={"events": chunk})
                reply.raise_for_status()
                for item in reply.json()["results"]:
                    statuses[item["status"]] += 1
                progress.advance(task, len(chunk))
            client.post("/v1/evaluations", json=evaluation).raise_for_status()
            progress.advance(task)

        # Idempotency: replays come back with the stored result and store nothing new.
        replays = singles[:5]
        replayed = [client.post("/v1/feedback", json=event) for event in replays]
        replay_ok = all(
            r.status_code == 200 and r.headers.get("Idempotent-Replayed") for r in replayed
        )

        by_kind: Counter[tuple[str, str]] = Counter()
        pages = 0
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/v1/signals", params=params)
            page.raise_for_status()
            body = page.json()
            pages += 1
            for item in body["items"]:
                if run in item["event_id"]:
                    by_kind[(item["source"], item["kind"])] += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break

    table = Table(title=f"signals ingested by this demo run ({run})")
    table.add_column("source")
    table.add_column("kind")
    table.add_column("signals", justify="right")
    for (source, kind), count in sorted(by_kind.items()):
        table.add_row(source, kind, str(count))
    table.add_row("[bold]all[/]", "", f"[bold]{sum(by_kind.values())}[/]")
    console.print(table)
    seconds = time.perf_counter() - started
    summary = {
        "run": run,
        "signals": dict(sorted((f"{s}/{k}", n) for (s, k), n in by_kind.items())),
        "stored": sum(by_kind.values()),
        "feedback_statuses": dict(statuses),
        "replays_idempotent": replay_ok,
        "pages_read": pages,
        "seconds": round(seconds, 2),
    }
    console.print(
        f"replayed {len(replays)} events: "
        f"{'same results, nothing stored twice' if replay_ok else 'NOT idempotent'}; "
        f"read back in {pages} page(s); {seconds:.1f} s"
    )
    return summary
