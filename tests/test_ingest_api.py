"""Happy paths of every endpoint, idempotent replays and conflicts, against real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flywheel.db.models import EvaluationRun, ModelVersion, Signal, SignalKind, SignalSource
from tests.conftest import KeyFactory
from tests.helpers import auth, new_id, thumbs_event

IMAGE = {"uri": "s3://bucket/out.png", "sha256": "AB" * 32}

FEEDBACK_CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"kind": "thumbs", "value": "up"}, {"thumbs_up": True}),
    ({"kind": "thumbs", "value": "down"}, {"thumbs_up": False}),
    ({"kind": "rating", "value": 2}, {"rating": 2}),
    (
        {
            "kind": "pairwise",
            "image": None,
            "chosen": {"uri": "s3://b/a.png"},
            "rejected": {"uri": "s3://b/b.png"},
        },
        {"chosen_image_uri": "s3://b/a.png", "rejected_image_uri": "s3://b/b.png"},
    ),
    ({"kind": "comment", "text": "the sign reads OPNE"}, {"comment": "the sign reads OPNE"}),
    (
        {"kind": "flags", "flags": ["text_wrong", "wrong_count"], "note": "two"},
        {"flags": ["text_wrong", "wrong_count"], "comment": "two"},
    ),
]


def _event(kind_fields: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": new_id(),
        "prompt": "a sign that reads 'OPEN'",
        "image": IMAGE,
        "model_version": "base-v0",
        "user_id": "u-1",
        "session_id": "s-1",
        "timestamp": "2026-11-24T09:15:00+01:00",
    }
    event.update(kind_fields)
    if event["image"] is None:
        del event["image"]
    return event


@pytest.mark.parametrize(("fields", "columns"), FEEDBACK_CASES, ids=lambda v: str(v)[:30])
def test_each_feedback_kind_is_stored_with_provenance(
    client: TestClient,
    make_key: KeyFactory,
    session: Session,
    fields: dict[str, Any],
    columns: dict[str, Any],
) -> None:
    key = make_key("ingest", app="web-app")
    event = _event(fields)

    reply = client.post("/v1/feedback", json=event, headers=auth(key))

    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["event_id"] == event["event_id"]
    assert body["app"] == "web-app"
    assert body["source"] == "feedback"
    assert body["kind"] == fields["kind"]
    signal = session.get_one(Signal, body["id"])
    assert signal.source is SignalSource.FEEDBACK
    assert signal.kind is SignalKind(fields["kind"])
    assert signal.prompt == event["prompt"]
    assert signal.user_ref == "u-1"
    assert signal.session_ref == "s-1"
    assert signal.occurred_at is not None
    assert signal.occurred_at.isoformat() == "2026-11-24T08:15:00+00:00"
    assert signal.payload["event_id"] == event["event_id"]
    if "image" in event:
        assert signal.image_uri == IMAGE["uri"]
        assert signal.image_sha256 == "ab" * 32  # normalized to lower case
    for column, expected in columns.items():
        assert getattr(signal, column) == expected
    version = session.get_one(ModelVersion, signal.model_version_id)
    assert version.name == "base-v0"


def test_editing_feedback_keeps_its_input_images(
    client: TestClient, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest")
    event = _event({"kind": "thumbs", "value": "down", "task": "image_editing"})
    event["input_images"] = [{"uri": "s3://b/in-1.png"}, {"uri": "s3://b/in-2.png"}]

    reply = client.post("/v1/feedback", json=event, headers=auth(key))

    assert reply.status_code == 201, reply.text
    signal = session.get_one(Signal, reply.json()["id"])
    assert signal.task.value == "image_editing"
    assert signal.input_images == [
        {"uri": "s3://b/in-1.png", "sha256": None},
        {"uri": "s3://b/in-2.png", "sha256": None},
    ]


def test_feedback_keeps_what_the_user_typed_and_what_the_model_was_given(
    client: TestClient, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest")
    served = "A poster with the words 'OPEN' in bold white letters on a red sign"
    pairwise = _event(
        {"kind": "pairwise", "chosen": {"uri": "s3://b/a.png"}, "rejected": {"uri": "s3://b/b.png"}}
    )
    events = [
        _event({"kind": "thumbs", "value": "down", "served_prompt": served}),
        pairwise | {"served_prompt": served},
        _event({"kind": "thumbs", "value": "down"}),
    ]

    replies = [client.post("/v1/feedback", json=e, headers=auth(key)) for e in events]

    assert [r.status_code for r in replies] == [201, 201, 201], [r.text for r in replies]
    thumbs, pair, plain = (session.get_one(Signal, r.json()["id"]) for r in replies)
    assert thumbs.prompt == "a sign that reads 'OPEN'"
    assert thumbs.details == {"served_prompt": served}
    assert pair.details is not None
    assert pair.details["served_prompt"] == served
    assert pair.details["chosen"] == {"uri": "s3://b/a.png", "sha256": None}
    assert plain.details is None
    empty = client.post(
        "/v1/feedback",
        json=_event({"kind": "thumbs", "value": "up", "served_prompt": ""}),
        headers=auth(key),
    )
    assert empty.status_code == 422
    assert "served_prompt" in empty.text


def test_replay_returns_the_original_result_and_stores_nothing_new(
    client: TestClient, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest")
    event = thumbs_event()
    first = client.post("/v1/feedback", json=event, headers=auth(key))
    # Same event, keys in another order: the canonical body is the same.
    replay = client.post("/v1/feedback", json=dict(reversed(event.items())), headers=auth(key))

    assert first.status_code == 201
    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    count = session.scalar(
        select(func.count()).select_from(Signal).where(Signal.event_id == event["event_id"])
    )
    assert count == 1


def test_same_event_id_with_another_body_is_a_conflict(
    client: TestClient, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest")
    event = thumbs_event()
    assert client.post("/v1/feedback", json=event, headers=auth(key)).status_code == 201

    reply = client.post("/v1/feedback", json={**event, "value": "up"}, headers=auth(key))

    assert reply.status_code == 409
    assert event["event_id"] in reply.json()["detail"]
    stored = session.scalars(select(Signal).where(Signal.event_id == event["event_id"])).one()
    assert stored.thumbs_up is False


def test_event_ids_are_scoped_per_app(client: TestClient, make_key: KeyFactory) -> None:
    event = thumbs_event()
    one = client.post("/v1/feedback", json=event, headers=auth(make_key("ingest")))
    other = client.post("/v1/feedback", json=event, headers=auth(make_key("ingest")))

    assert one.status_code == other.status_code == 201
    assert one.json()["id"] != other.json()["id"]


def test_batch_stores_valid_items_and_reports_each(
    client: TestClient, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest")
    earlier = thumbs_event()
    assert client.post("/v1/feedback", json=earlier, headers=auth(key)).status_code == 201
    fresh = [thumbs_event(), thumbs_event(kind="rating", value=5)]
    duplicated = thumbs_event()
    events: list[Any] = [
        fresh[0],
        {**thumbs_event(), "value": "sideways"},  # invalid
        earlier,  # replay of a stored event
        {**earlier, "value": "up"},  # conflict with a stored event
        fresh[1],
        duplicated,
        duplicated,  # repeated inside the batch
        {**duplicated, "prompt": "another"},  # conflict inside the batch
        "not an object",
    ]

    reply = client.post("/v1/feedback/batch", json={"events": events}, headers=auth(key))

    assert reply.status_code == 207, reply.text
    body = reply.json()
    statuses = [(r["index"], r["status"], r["status_code"]) for r in body["results"]]
    assert statuses == [
        (0, "created", 201),
        (1, "invalid", 422),
        (2, "duplicate", 200),
        (3, "conflict", 409),
        (4, "created", 201),
        (5, "created", 201),
        (6, "duplicate", 200),
        (7, "conflict", 409),
        (8, "invalid", 422),
    ]
    assert (body["created"], body["duplicates"], body["conflicts"], body["invalid"]) == (3, 2, 2, 2)
    assert "value" in body["results"][1]["error"]
    assert body["results"][6]["id"] == body["results"][5]["id"]
    ids = [e["event_id"] for e in (*fresh, duplicated, events[1])]
    stored = session.scalars(select(Signal.event_id).where(Signal.event_id.in_(ids))).all()
    assert sorted(stored) == sorted(ids[:3])


def test_evaluation_run_becomes_one_signal_per_sample(
    client: TestClient, make_key: KeyFactory, session: Session
) -> None:
    key = make_key("ingest", app="nightly-eval")
    run = {
        "run_id": new_id("run"),
        "benchmark": "world-v1",
        "suite": "standard",
        "model_version": "base-v1",
        "timestamp": "2026-11-24T03:00:00Z",
        "samples": [
            {
                "sample_id": f"s{i}",
                "prompt": f"{i} red circles",
                "image": {"uri": f"s3://eval/{i}.png"},
                "skill": "count",
                "scores": {"count": i / 4, "overall": 0.5},
                "passed": i >= 2,
                "spec": {"objects": [{"shape": "circle", "colour": "red", "count": i}]},
            }
            for i in range(4)
        ],
    }

    reply = client.post("/v1/evaluations", json=run, headers=auth(key))
    replay = client.post("/v1/evaluations", json=run, headers=auth(key))
    conflict = client.post("/v1/evaluations", json={**run, "benchmark": "other"}, headers=auth(key))

    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert (body["samples"], body["passed"], body["model_version"]) == (4, 2, "base-v1")
    assert replay.status_code == 200
    assert replay.json() == body
    assert conflict.status_code == 409
    stored_run = session.get_one(EvaluationRun, body["id"])
    assert stored_run.benchmark == "world-v1"
    samples = session.scalars(
        select(Signal).where(Signal.evaluation_run_id == body["id"]).order_by(Signal.id)
    ).all()
    assert [s.source for s in samples] == [SignalSource.EVALUATION] * 4
    assert [s.passed for s in samples] == [False, False, True, True]
    assert samples[3].scores == {"count": 0.75, "overall": 0.5}
    assert samples[3].details is not None
    assert samples[3].details["spec"]["objects"][0]["count"] == 3


def _page(client: TestClient, key: str, **params: Any) -> dict[str, Any]:
    reply = client.get("/v1/signals", params=params, headers=auth(key))
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_signals_paginate_with_a_cursor_and_filter(
    client: TestClient, make_key: KeyFactory
) -> None:
    app = f"reader-{new_id()[:12]}"
    writer, reader = make_key("ingest", app=app), make_key("read", app=app)
    events = [thumbs_event(model_version="v-a" if i % 2 else "v-b") for i in range(7)]
    events.append(thumbs_event(kind="rating", value=3, model_version="v-a"))
    client.post("/v1/feedback/batch", json={"events": events}, headers=auth(writer))

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = _page(client, reader, **params)
        seen += [item["event_id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == [e["event_id"] for e in reversed(events)]  # newest first, no gaps
    assert len(_page(client, reader, kind="rating")["items"]) == 1
    assert len(_page(client, reader, model_version="v-a")["items"]) == 4
    assert _page(client, reader, model_version="never-seen")["items"] == []
    assert len(_page(client, reader, source="feedback")["items"]) == 8
    assert _page(client, reader, source="evaluation")["items"] == []
    item = _page(client, reader, limit=1)["items"][0]
    assert item["model_version"] == "v-a"
    assert item["rating"] == 3


def test_signals_time_range_filter(client: TestClient, make_key: KeyFactory) -> None:
    app = f"timed-{new_id()[:12]}"
    writer, reader = make_key("ingest", app=app), make_key("read", app=app)
    client.post("/v1/feedback", json=thumbs_event(), headers=auth(writer))
    received = _page(client, reader)["items"][0]["received_at"]

    assert len(_page(client, reader, since=received)["items"]) == 1
    assert _page(client, reader, until=received)["items"] == []
    assert _page(client, reader, since="2999-01-01T00:00:00Z")["items"] == []


def test_read_keys_see_only_their_app_and_admin_sees_all(
    client: TestClient, make_key: KeyFactory
) -> None:
    app = f"private-{new_id()[:12]}"
    client.post("/v1/feedback", json=thumbs_event(), headers=auth(make_key("ingest", app=app)))

    stranger = make_key("read")
    reply = client.get("/v1/signals", params={"app": app}, headers=auth(stranger))
    assert reply.status_code == 403
    assert _page(client, stranger)["items"] == []
    admin = make_key("admin")
    assert len(_page(client, admin, app=app)["items"]) == 1


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["database"] == "ok"
