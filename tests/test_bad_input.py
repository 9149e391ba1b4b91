"""Bad input gets a clear 4xx naming what is wrong, never a 500, and nothing half-written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from flywheel.api.app import create_app
from flywheel.db.models import EvaluationRun, Signal
from flywheel.settings import Settings
from tests.conftest import KeyFactory
from tests.helpers import auth, new_id, thumbs_event


@pytest.fixture(scope="module")
def ingest_key(make_key: KeyFactory) -> str:
    return make_key("ingest", "read")


def _count(session: Session, event_id: str) -> int:
    return (
        session.scalar(select(func.count()).select_from(Signal).where(Signal.event_id == event_id))
        or 0
    )


def test_malformed_json_is_400(client: TestClient, ingest_key: str) -> None:
    for body in (b'{"kind": "thumbs",', b"\xff\xfe garbage", b'{"a": 1}}'):
        reply = client.post(
            "/v1/feedback",
            content=body,
            headers={**auth(ingest_key), "Content-Type": "application/json"},
        )
        assert reply.status_code == 400, reply.text
        assert "malformed JSON" in reply.json()["detail"]


WRONG: list[tuple[dict[str, Any], str]] = [
    ({"value": "sideways"}, "thumbs.value"),
    ({"kind": "rating", "value": 7}, "rating.value"),
    ({"kind": "rating", "value": "5"}, "rating.value"),
    ({"kind": "rating", "value": 4.5}, "rating.value"),
    ({"kind": "rating", "value": True}, "rating.value"),
    ({"kind": "meh"}, "kind"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "nul \x00 inside"}, "prompt"),
    ({"prompt": "lone \ud800 surrogate"}, "prompt"),
    ({"user_id": "\udfff"}, "user_id"),
    ({"event_id": "has space"}, "event_id"),
    ({"event_id": "x" * 201}, "event_id"),
    ({"image": {"uri": "no-scheme"}}, "image.uri"),
    ({"image": {"uri": "s3://b/i.png", "sha256": "abc"}}, "image.sha256"),
    ({"image": None}, "image"),
    ({"timestamp": "2026-11-24T09:00:00"}, "timestamp"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"surprise": 1}, "surprise"),
    ({"task": "image_editing"}, "input_images"),
    ({"model_version": None}, "model_version"),
]


@pytest.mark.parametrize(
    ("change", "field"), WRONG, ids=[w[1] + str(i) for i, w in enumerate(WRONG)]
)
def test_wrong_fields_are_422_naming_the_field(
    client: TestClient, ingest_key: str, session: Session, change: dict[str, Any], field: str
) -> None:
    event = {**thumbs_event(), **change}
    # json.dumps escapes non-ASCII: lone surrogates travel as \uXXXX escapes.
    reply = client.post(
        "/v1/feedback",
        content=json.dumps(event),
        headers={**auth(ingest_key), "Content-Type": "application/json"},
    )

    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert field in body["message"], body["message"]
    assert body["detail"]
    assert _count(session, str(event["event_id"])) == 0


def test_pairwise_needs_two_different_images(client: TestClient, ingest_key: str) -> None:
    event = thumbs_event(
        kind="pairwise", chosen={"uri": "s3://a.png"}, rejected={"uri": "s3://a.png"}
    )
    del event["value"]
    reply = client.post("/v1/feedback", json=event, headers=auth(ingest_key))
    assert reply.status_code == 422
    assert "rejected" in reply.json()["message"]


def test_body_that_is_not_an_object(client: TestClient, ingest_key: str) -> None:
    bodies: list[object] = [[], "text", 3, None]
    for body in bodies:
        reply = client.post("/v1/feedback", json=body, headers=auth(ingest_key))
        assert reply.status_code == 422, (body, reply.text)


def test_batch_shape_errors(client: TestClient, ingest_key: str) -> None:
    for body, field in (
        ({"events": []}, "events"),
        ({"events": "nope"}, "events"),
        ({}, "events"),
        ({"events": [thumbs_event()] * 1001}, "events"),
        ({"events": [thumbs_event()], "extra": 1}, "extra"),
    ):
        reply = client.post("/v1/feedback/batch", json=body, headers=auth(ingest_key))
        assert reply.status_code == 422, reply.text
        assert field in reply.json()["message"]


def test_a_batch_of_1000_is_accepted(client: TestClient, ingest_key: str) -> None:
    events = [thumbs_event() for _ in range(1000)]
    reply = client.post("/v1/feedback/batch", json={"events": events}, headers=auth(ingest_key))
    assert reply.status_code == 207
    assert reply.json()["created"] == 1000


def test_evaluation_with_one_bad_sample_stores_nothing(
    client: TestClient, ingest_key: str, session: Session
) -> None:
    run_id = new_id("run")
    samples = [
        {
            "sample_id": f"s{i}",
            "prompt": "p",
            "image": {"uri": "s3://x/y.png"},
            "scores": {"a": 0.5},
            "passed": True,
        }
        for i in range(3)
    ]
    samples[2]["scores"] = {"a": "high"}
    run = {"run_id": run_id, "benchmark": "b", "model_version": "v", "samples": samples}

    reply = client.post("/v1/evaluations", json=run, headers=auth(ingest_key))

    assert reply.status_code == 422
    assert "samples.2.scores.a" in reply.json()["message"]
    assert session.scalar(select(EvaluationRun).where(EvaluationRun.run_id == run_id)) is None


def test_evaluation_rejects_repeated_samples_and_infinite_scores(
    client: TestClient, ingest_key: str
) -> None:
    sample = {
        "sample_id": "s",
        "prompt": "p",
        "image": {"uri": "s3://x/y.png"},
        "scores": {"a": 0.5},
        "passed": True,
    }
    base = {"run_id": new_id("run"), "benchmark": "b", "model_version": "v"}
    repeated = client.post(
        "/v1/evaluations", json={**base, "samples": [sample, sample]}, headers=auth(ingest_key)
    )
    assert repeated.status_code == 422
    assert "appears more than once" in repeated.json()["message"]

    infinite = json.dumps({**base, "samples": [{**sample, "scores": {"a": 1e999}}]})
    reply = client.post(
        "/v1/evaluations",
        content=infinite,
        headers={**auth(ingest_key), "Content-Type": "application/json"},
    )
    assert reply.status_code == 422
    assert "samples.0.scores.a" in reply.json()["message"]

    spec_nul = {**sample, "spec": {"text": "a\x00b"}}
    reply = client.post(
        "/v1/evaluations", json={**base, "samples": [spec_nul]}, headers=auth(ingest_key)
    )
    assert reply.status_code == 422
    assert "spec" in reply.json()["message"]


def test_bad_query_parameters(client: TestClient, ingest_key: str) -> None:
    for params, status, needle in (
        ({"limit": 0}, 422, "limit"),
        ({"limit": 501}, 422, "limit"),
        ({"limit": "many"}, 422, "limit"),
        ({"source": "rumour"}, 422, "source"),
        ({"since": "2026-01-01T00:00:00"}, 422, "since"),
        ({"cursor": "!!!"}, 400, "cursor"),
        ({"cursor": "czEyYWI"}, 400, "cursor"),
        ({"model_version": "a\x00b"}, 422, "model_version"),
        ({"app": "x\x00"}, 422, "app"),
    ):
        reply = client.get("/v1/signals", params=params, headers=auth(ingest_key))
        assert reply.status_code == status, (params, reply.text)
        assert needle in reply.text


@pytest.fixture(scope="module")
def small_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"max_request_bytes": 4096}))) as c:
        yield c


def test_oversized_bodies_are_413(
    small_client: TestClient, ingest_key: str, session: Session
) -> None:
    event = thumbs_event(prompt="x" * 5000)
    reply = small_client.post("/v1/feedback", json=event, headers=auth(ingest_key))
    assert reply.status_code == 413
    assert "4096" in reply.json()["detail"]

    # Chunked upload with no Content-Length: counted while streamed.
    def chunks() -> Iterator[bytes]:
        payload = json.dumps(event).encode()
        for start in range(0, len(payload), 1000):
            yield payload[start : start + 1000]

    reply = small_client.post(
        "/v1/feedback",
        content=chunks(),
        headers={**auth(ingest_key), "Content-Type": "application/json"},
    )
    assert reply.status_code == 413
    assert _count(session, str(event["event_id"])) == 0


def test_database_outage_is_503_with_retry_after(settings: Settings, make_key: KeyFactory) -> None:
    key = make_key("ingest", "read")
    down = settings.model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:1/flywheel", "db_pool_size": 1}
    )
    with TestClient(create_app(down)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["Retry-After"]
        reply = c.post("/v1/feedback", json=thumbs_event(), headers=auth(key))
        assert reply.status_code == 503
        assert reply.headers["Retry-After"]
        assert c.get("/healthz").status_code == 200


def test_api_recovers_by_itself_when_its_connections_are_killed(
    client: TestClient,
    ingest_key: str,
    settings: Settings,
    postgres_admin_url: str,
    session: Session,
) -> None:
    """Server-side loss of every pooled connection (as in a database restart): the next
    requests succeed on fresh connections, and nothing is stored twice."""
    first = client.post("/v1/feedback", json=thumbs_event(), headers=auth(ingest_key))
    assert first.status_code == 201
    assert settings.database_url is not None
    database = make_url(settings.database_url).database
    with psycopg.connect(
        make_url(postgres_admin_url).set(drivername="postgresql").render_as_string(False),
        autocommit=True,
    ) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    assert killed is not None
    assert killed[0] >= 1

    events = [thumbs_event() for _ in range(5)]
    codes = [
        client.post("/v1/feedback", json=e, headers=auth(ingest_key)).status_code for e in events
    ]
    assert codes == [201] * 5
    assert all(_count(session, str(e["event_id"])) == 1 for e in events)
    reads = client.get("/v1/signals", headers=auth(ingest_key))
    assert reads.status_code == 200
    assert client.get("/readyz").status_code == 200


def test_times_are_stored_in_utc_whatever_their_offset(
    client: TestClient, ingest_key: str, session: Session
) -> None:
    """ISO 8601 allows offsets PostgreSQL refuses (beyond ±15:59); schemathesis found the 500."""
    event = thumbs_event(timestamp="0127-03-08T19:22:30-18:54", kind="rating", value=4.0)
    reply = client.post("/v1/feedback", json=event, headers=auth(ingest_key))
    assert reply.status_code == 201, reply.text
    stored = session.scalars(select(Signal).where(Signal.event_id == event["event_id"])).one()
    assert stored.occurred_at == datetime(127, 3, 9, 14, 16, 30, tzinfo=UTC)
    assert stored.rating == 4
    page = client.get(
        "/v1/signals", params={"since": "2026-01-01T00:00:00+23:59"}, headers=auth(ingest_key)
    )
    assert page.status_code == 200, page.text
    too_early = thumbs_event(timestamp="0001-01-01T00:00:00+05:00")
    refused = client.post("/v1/feedback", json=too_early, headers=auth(ingest_key))
    assert refused.status_code == 422
    assert "between the years 1 and 9999" in refused.json()["message"]


def test_longest_run_and_sample_ids_fit(client: TestClient, ingest_key: str) -> None:
    sample = {
        "prompt": "p",
        "image": {"uri": "s3://x/y.png"},
        "scores": {"a": 0.5},
        "passed": True,
    }
    run_id = new_id("run")[:16] + "r" * 104
    longest = {
        "run_id": run_id,
        "benchmark": "b",
        "model_version": "v",
        "samples": [{**sample, "sample_id": "s" * 120}],
    }
    reply = client.post("/v1/evaluations", json=longest, headers=auth(ingest_key))
    assert reply.status_code == 201, reply.text

    too_long = {**longest, "run_id": run_id + "x"}
    reply = client.post("/v1/evaluations", json=too_long, headers=auth(ingest_key))
    assert reply.status_code == 422
    assert "run_id" in reply.json()["message"]
