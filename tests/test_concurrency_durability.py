"""Against a real uvicorn process: concurrent replays create one row; an acknowledged
event survives SIGKILL of the API."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flywheel.db.models import Signal
from flywheel.settings import Settings
from tests.conftest import KeyFactory
from tests.helpers import ApiProcess, auth, new_id, thumbs_event


def _post_all(base_url: str, key: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(bodies))

    def post(body: dict[str, object]) -> httpx.Response:
        with httpx.Client(base_url=base_url, headers=auth(key), timeout=30) as client:
            barrier.wait()
            return client.post("/v1/feedback", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_concurrent_replays_create_exactly_one_row(
    live_api: ApiProcess, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest")
    for _ in range(5):
        event = thumbs_event()
        replies = _post_all(live_api.base_url, key, [event] * 12)

        codes = Counter(r.status_code for r in replies)
        assert codes == {201: 1, 200: 11}, codes
        assert len({r.json()["id"] for r in replies}) == 1
        count = session.scalar(
            select(func.count()).select_from(Signal).where(Signal.event_id == event["event_id"])
        )
        assert count == 1


def test_concurrent_different_bodies_one_wins_the_rest_conflict(
    live_api: ApiProcess, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest")
    event_id = new_id()
    bodies: list[dict[str, object]] = [
        thumbs_event(event_id=event_id, prompt=f"variant {i}") for i in range(8)
    ]

    replies = _post_all(live_api.base_url, key, bodies)

    codes = Counter(r.status_code for r in replies)
    assert codes == {201: 1, 409: 7}, codes
    winner = next(b for b, r in zip(bodies, replies, strict=True) if r.status_code == 201)
    stored = session.scalars(select(Signal).where(Signal.event_id == event_id)).one()
    assert stored.prompt == winner["prompt"]


@pytest.mark.timeout(120)
def test_acknowledged_events_survive_sigkill(
    settings: Settings, make_key: KeyFactory, session: Session, tmp_path: Path
) -> None:
    api = ApiProcess(settings, log=tmp_path / "api.log")
    key = make_key("ingest")
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        with httpx.Client(base_url=api.base_url, headers=auth(key), timeout=5) as client:
            while not stop.is_set():
                event = thumbs_event(event_id=f"kill-{worker}-{new_id()}")
                try:
                    reply = client.post("/v1/feedback", json=event)
                except httpx.HTTPError:
                    return  # the server is gone
                if reply.status_code == 201:
                    acknowledged.append(str(event["event_id"]))

    try:
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        while len(acknowledged) < 200:
            stop.wait(0.01)
        api.process.send_signal(signal.SIGKILL)
        api.process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(10)
    finally:
        stop.set()
        api.stop()

    assert api.process.returncode == -signal.SIGKILL
    stored = set(
        session.scalars(select(Signal.event_id).where(Signal.event_id.in_(acknowledged))).all()
    )
    assert len(acknowledged) >= 200
    assert stored == set(acknowledged)
