"""The review queue's leases and batch decisions, in the service, the API and the CLI,
against a real PostgreSQL: concurrent reviewers never claim the same item, an expired
lease returns the item, a live one keeps others out, a cluster is decided at once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flywheel.api.app import create_app
from flywheel.auth.service import create_api_key
from flywheel.cli.main import app
from flywheel.db.engine import create_db_engine
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    Decider,
    FailureCase,
    FailureCluster,
    ReviewAudit,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    Scope,
    Task,
    Track,
)
from flywheel.review import repository
from flywheel.review.service import (
    ClaimConflictError,
    ReviewError,
    approve,
    claim_next,
    decide_cluster,
    release,
)
from flywheel.settings import Settings, get_settings


def _triage_items(session: Session, n: int, *, cluster: str = "colour: purple") -> list[int]:
    """``n`` cases awaiting triage in one cluster, each with its triage item; their ids."""
    group = FailureCluster(label=cluster)
    session.add(group)
    session.flush()
    ids = []
    for k in range(n):
        case = FailureCase(
            dedup_key=f"{cluster}-{k}",
            cluster_id=group.id,
            status=CaseStatus.AWAITING_TRIAGE,
            task=Task.TEXT_TO_IMAGE,
            prompt=f"a purple square {k}",
        )
        session.add(case)
        session.flush()
        session.add(
            CaseRoute(
                case_id=case.id,
                track=Track.PRETRAINING_GAP,
                confidence=0.4,
                evidence={},
                decided_by=Decider.MODEL,
                decider_ref="test",
            )
        )
        item = repository.add_triage_item(
            session, case=case, title=f"route {case.id}?", artefact={"case_id": case.id}
        )
        ids.append(item.id)
    session.commit()
    return ids


def test_concurrent_reviewers_never_claim_the_same_item(fresh_engine: Engine) -> None:
    with Session(fresh_engine) as session:
        items = _triage_items(session, 30)
    reviewers = 8
    engine = create_db_engine(
        Settings(database_url=fresh_engine.url.render_as_string(False)), pool_size=reviewers
    )
    start = threading.Barrier(reviewers)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def reviewer(name: str) -> None:
        mine: list[int] = []
        try:
            start.wait()
            with Session(engine) as session:
                while (item := claim_next(session, reviewer=name)) is not None:
                    mine.append(item.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        claimed[name] = mine

    threads = [threading.Thread(target=reviewer, args=(f"r{k}",)) for k in range(reviewers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    engine.dispose()
    assert not errors
    every = [i for ids in claimed.values() for i in ids]
    assert Counter(every).most_common(1)[0][1] == 1  # nobody got an item twice
    assert sorted(every) == items  # and every item went to someone
    assert sum(1 for ids in claimed.values() if ids) >= 2  # they really competed
    with Session(fresh_engine) as session:
        rows = session.scalars(select(ReviewItem)).all()
        assert {(r.status, r.claimed_by is not None) for r in rows} == {
            (ReviewStatus.CLAIMED, True)
        }
        claims = session.scalars(select(ReviewAudit).where(ReviewAudit.action == "claimed")).all()
        assert len(claims) == 30


def test_a_live_lease_keeps_others_out_and_an_expired_one_returns_the_item(
    fresh_engine: Engine,
) -> None:
    with Session(fresh_engine) as session:
        first, second = _triage_items(session, 2)
        # Alice's lease on the first item ran out five minutes ago.
        long_ago = datetime.now(UTC) - timedelta(minutes=20)
        mine = claim_next(session, reviewer="alice", now=long_ago)
        assert mine is not None
        assert mine.id == first
        # Bob's claim returns the oldest claimable item: Alice's, whose lease expired.
        bob = claim_next(session, reviewer="bob")
        assert bob is not None
        assert (bob.id, bob.claimed_by) == (first, "bob")
        assert bob.artefact == {"case_id": bob.case_id}
        # Alice can no longer decide it; nor can she release it.
        with pytest.raises(ClaimConflictError, match="claimed by bob"):
            approve(session, item_id=first, reviewer="alice", track=Track.RL)
        session.rollback()
        with pytest.raises(ClaimConflictError):
            release(session, item_id=first, reviewer="alice")
        session.rollback()
        carol = claim_next(session, reviewer="carol")
        assert carol is not None
        assert carol.id == second
        assert claim_next(session, reviewer="dave") is None  # both held
        # Bob gives his back; Dave gets it and decides it.
        release(session, item_id=first, reviewer="bob")
        dave = claim_next(session, reviewer="dave", kind=ReviewKind.TRIAGE_CASE)
        assert dave is not None
        assert dave.id == first
        decided = approve(session, item_id=first, reviewer="dave", track=Track.PRETRAINING_GAP)
        assert (decided.status, decided.decided_by) == ("approved", "dave")
        actions = [
            a.action
            for a in session.scalars(
                select(ReviewAudit)
                .where(ReviewAudit.review_item_id == first)
                .order_by(ReviewAudit.id)
            )
        ]
        assert actions == ["created", "claimed", "claimed", "released", "claimed", "approved"]
        with pytest.raises(ReviewError, match="positive"):
            claim_next(session, reviewer="erin", lease=timedelta(0))


def test_a_cluster_is_decided_at_once_except_what_others_hold(fresh_engine: Engine) -> None:
    with Session(fresh_engine) as session:
        items = _triage_items(session, 4)
        cluster = session.scalar(select(ReviewItem.cluster_id).where(ReviewItem.id == items[0]))
        assert cluster is not None
        held = claim_next(session, reviewer="bob")
        assert held is not None
        result = decide_cluster(
            session,
            cluster_id=cluster,
            kind=ReviewKind.TRIAGE_CASE,
            approved=True,
            reviewer="alice",
            reason="all purple: a corpus gap",
            track=Track.PRETRAINING_GAP,
        )
        assert result.decided == items[1:]
        assert list(result.skipped) == [held.id]
        assert "claimed by bob" in result.skipped[held.id]
        cases = session.scalars(select(FailureCase).order_by(FailureCase.id)).all()
        assert [c.status for c in cases] == [CaseStatus.AWAITING_TRIAGE] + [CaseStatus.ROUTED] * 3
        with pytest.raises(ReviewError, match="reason"):
            decide_cluster(
                session,
                cluster_id=cluster,
                kind=ReviewKind.TRIAGE_CASE,
                approved=False,
                reviewer="alice",
            )
        with pytest.raises(ReviewError, match="on its own"):
            decide_cluster(
                session,
                cluster_id=cluster,
                kind=ReviewKind.MODEL_PROMOTION,
                approved=True,
                reviewer="alice",
            )


@pytest.fixture
def api(migrated_url: str) -> Iterator[tuple[TestClient, Engine]]:
    settings = Settings(database_url=migrated_url)
    engine = create_db_engine(settings, pool_size=2)
    with TestClient(create_app(settings)) as client:
        yield client, engine
    engine.dispose()


def _key(engine: Engine, app_name: str, *scopes: Scope) -> dict[str, str]:
    with Session(engine) as session:
        created = create_api_key(session, app=app_name, scopes=list(scopes))
        session.commit()
    return {"Authorization": f"Bearer {created.secret}"}


def test_review_api(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    with Session(engine) as session:
        items = _triage_items(session, 3)
        promotion = ReviewItem(
            kind=ReviewKind.AUGMENTATION_BATCH,
            status=ReviewStatus.PENDING,
            title="batch",
            artefact={
                "retrieved": 10,
                "editable": {
                    "drop": {
                        "what": "retrieved pool scenes",
                        "items": ["pool:17", "pool:18"],
                        "by_index": False,
                        "kept_anyway": 8,
                    }
                },
            },
        )
        session.add(promotion)
        session.commit()
        batch_id = promotion.id
    alice = _key(engine, "alice", Scope.REVIEW)
    bob = _key(engine, "bob", Scope.REVIEW)
    ingest = _key(engine, "web", Scope.INGEST)
    admin = _key(engine, "ops", Scope.ADMIN)

    # The auth matrix of every endpoint: no key 401, a key without the scope 403.
    calls = [
        ("get", "/v1/review/items", None),
        ("get", f"/v1/review/items/{items[0]}", None),
        ("post", "/v1/review/claim", {}),
        ("post", f"/v1/review/items/{items[0]}/release", None),
        ("post", f"/v1/review/items/{items[0]}/approve", {"track": "rl"}),
        ("post", f"/v1/review/items/{items[0]}/reject", {"reason": "no"}),
        ("post", "/v1/review/clusters/1/decide", {"kind": "triage_case", "decision": "approve"}),
    ]
    for method, path, body in calls:
        assert client.request(method, path, json=body).status_code == 401, path
        assert client.request(method, path, json=body, headers=ingest).status_code == 403, path

    page = client.get("/v1/review/items", params={"limit": 2}, headers=alice).json()
    assert [i["id"] for i in page["items"]] == items[:2]
    rest = client.get(
        "/v1/review/items", params={"limit": 2, "after": page["next_after"]}, headers=alice
    ).json()
    assert [i["id"] for i in rest["items"]] == [items[2], batch_id]
    assert rest["next_after"] is None

    claimed = client.post("/v1/review/claim", json={"lease_seconds": 60}, headers=alice)
    assert claimed.status_code == 200, claimed.text
    assert (claimed.json()["id"], claimed.json()["claimed_by"]) == (items[0], "alice")
    taken = client.post(f"/v1/review/items/{items[0]}/approve", json={"track": "rl"}, headers=bob)
    assert taken.status_code == 409
    assert "claimed by alice" in taken.json()["detail"]
    no_track = client.post(f"/v1/review/items/{items[0]}/approve", json={}, headers=alice)
    assert no_track.status_code == 409
    assert "track" in no_track.json()["detail"]
    done = client.post(
        f"/v1/review/items/{items[0]}/approve",
        json={"track": "pretraining_gap", "reason": "purple is rare"},
        headers=alice,
    )
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["decided_by"]) == ("approved", "alice")
    again = client.post(f"/v1/review/items/{items[0]}/reject", json={"reason": "x"}, headers=bob)
    assert again.status_code == 409
    detail = client.get(f"/v1/review/items/{items[0]}", headers=bob).json()
    assert [a["action"] for a in detail["audit"]] == ["created", "claimed", "approved"]
    assert detail["audit"][-1]["before"] == {"status": "claimed"}

    # Edits need a reason; edits the artefact does not declare are refused naming the edit
    # (422, as an invalid body); an artefact approved as edited keeps the edits.
    edit = {"edits": {"drop": ["pool:17"]}}
    assert (
        client.post(f"/v1/review/items/{batch_id}/approve", json=edit, headers=bob).status_code
        == 409
    )
    for edits, where, needle in [
        ({"shuffle": True}, ["body", "edits", "shuffle"], "unknown key 'shuffle'"),
        ({"drop": ["pool:99"]}, ["body", "edits", "drop"], "'pool:99' names none of the 2"),
        ({"drop": [0]}, ["body", "edits", "drop"], "named by id, not by index"),
        ({"weights": {"count": 0.0}}, ["body", "edits", "weights"], "unknown key 'weights'"),
    ]:
        refused = client.post(
            f"/v1/review/items/{batch_id}/approve",
            json={"edits": edits, "reason": "try"},
            headers=bob,
        )
        assert refused.status_code == 422, refused.text
        (error,) = refused.json()["detail"]
        assert error["loc"] == where
        assert needle in error["msg"]
    assert client.get(f"/v1/review/items/{batch_id}", headers=bob).json()["item"]["status"] == (
        "pending"
    )
    edited = client.post(
        f"/v1/review/items/{batch_id}/approve",
        json=edit | {"reason": "a duplicate scene"},
        headers=admin,
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["edits"] == {"drop": ["pool:17"]}

    cluster = detail["item"]["cluster_id"]
    decided = client.post(
        f"/v1/review/clusters/{cluster}/decide",
        json={"kind": "triage_case", "decision": "reject", "reason": "not failures"},
        headers=bob,
    )
    assert decided.status_code == 200, decided.text
    assert decided.json() == {"decided": items[1:], "skipped": {}}
    assert client.post("/v1/review/claim", json={}, headers=bob).status_code == 204
    assert client.get("/v1/review/items/999999", headers=bob).status_code == 404
    bad = client.post("/v1/review/claim", json={"lease_seconds": 1}, headers=bob)
    assert bad.status_code == 422
    assert "lease_seconds" in bad.text
    unknown = client.post(
        "/v1/review/clusters/999/decide",
        json={"kind": "triage_case", "decision": "approve", "track": "rl"},
        headers=bob,
    )
    assert unknown.status_code == 404


def test_review_cli_claim_release_and_cluster(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Session(fresh_engine) as session:
        items = _triage_items(session, 2)
        cluster = session.scalar(select(ReviewItem.cluster_id).where(ReviewItem.id == items[0]))
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", fresh_engine.url.render_as_string(False))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        claimed = runner.invoke(app, ["review", "claim", "--by", "alice", "--json"])
        assert claimed.exit_code == 0, claimed.output
        released = runner.invoke(app, ["review", "release", str(items[0]), "--by", "bob"])
        assert released.exit_code == 2
        assert "not claimed by bob" in released.output or "claimed by alice" in released.output
        released = runner.invoke(app, ["review", "release", str(items[0]), "--by", "alice"])
        assert released.exit_code == 0, released.output
        decided = runner.invoke(
            app,
            ["review", "decide-cluster", str(cluster), "--by", "carol", "--track", "rl"],
        )
        assert decided.exit_code == 0, decided.output
        assert "2 decided, 0 skipped" in decided.output
        empty = runner.invoke(app, ["review", "claim", "--by", "alice"])
        assert empty.exit_code == 1
        assert "nothing is waiting" in empty.output
        bad = runner.invoke(app, ["review", "approve", str(items[0]), "--by", "a", "--edits", "[1"])
        assert bad.exit_code == 2
    finally:
        get_settings.cache_clear()
