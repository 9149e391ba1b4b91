"""The model registry, the cycle lock, ``flywheel status`` and the review queue against a
real PostgreSQL (a fresh migrated database per test)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.cycle.lock import CycleBusyError, cycle_lock
from flywheel.cycle.registry import (
    RegistryError,
    current_model,
    promote,
    register_version,
)
from flywheel.cycle.status import status_report
from flywheel.db.engine import create_db_engine, session_factory
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    Component,
    Cycle,
    CycleStatus,
    Decider,
    FailureCase,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    Task,
    Track,
)
from flywheel.review import repository as review_repository
from flywheel.review.service import ReviewError, approve, list_queue, reject, show_item
from flywheel.settings import Settings, get_settings
from flywheel.world.loop.backend import BASE_VERSION, shipped_base

runner = CliRunner()


@pytest.fixture
def cli(migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", migrated_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_registry_starts_from_the_shipped_base(fresh_engine: Engine, tmp_path: Path) -> None:
    with session_factory(fresh_engine)() as session:
        assert current_model(session) is None
        base = current_model(session, shipped=shipped_base())
        assert base is not None
        session.commit()
        assert base.name == BASE_VERSION
        assert base.components() == {c: p.resolve() for c, p in shipped_base().components.items()}
        again = current_model(session, shipped=shipped_base())
        assert again == base  # registered once
        with pytest.raises(RegistryError, match="already registered"):
            register_version(session, name=BASE_VERSION, components=shipped_base().components)
        with pytest.raises(RegistryError, match="no enhancer, reward"):
            register_version(session, name="partial", components={Component.GENERATOR: tmp_path})
        components = {**shipped_base().components, Component.ENHANCER: tmp_path}
        with pytest.raises(RegistryError, match="missing"):
            register_version(
                session, name="gone", components={**components, Component.REWARD: tmp_path / "x"}
            )
        candidate = register_version(session, name="cycle-1", components=components)
        assert current_model(session, shipped=shipped_base()) == base  # registered, not promoted
        promote(session, version_id=candidate)
        session.commit()
        serving = current_model(session, shipped=shipped_base())
        assert serving is not None
        assert (serving.name, serving.enhancer) == ("cycle-1", tmp_path.resolve())


_HOLD = """
import sys, time
from flywheel.cycle.lock import cycle_lock
from flywheel.db.engine import create_db_engine
from flywheel.settings import Settings

with cycle_lock(create_db_engine(Settings(database_url=sys.argv[1]), pool_size=1)):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_cycle_at_a_time(fresh_engine: Engine, migrated_url: str) -> None:
    other = create_db_engine(Settings(database_url=migrated_url), pool_size=1)
    try:
        with (
            cycle_lock(fresh_engine),
            pytest.raises(CycleBusyError, match="another cycle"),
            cycle_lock(other),
        ):
            pass  # pragma: no cover - the lock is taken
        with cycle_lock(other):  # released with the first block
            pass
    finally:
        other.dispose()
    # A holder whose process dies releases the lock with its connection.
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, migrated_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CycleBusyError), cycle_lock(fresh_engine):
            pass  # pragma: no cover - the lock is taken
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            with cycle_lock(fresh_engine):
                break
        except CycleBusyError:
            assert time.monotonic() < deadline, "the dead holder's lock was not released"
            time.sleep(0.1)


def _case(session: Session, number: int, status: CaseStatus) -> FailureCase:
    case = FailureCase(
        dedup_key=f"key-{number}",
        status=status,
        task=Task.TEXT_TO_IMAGE,
        prompt=f"prompt {number}",
        skill="colour",
    )
    session.add(case)
    session.flush()
    return case


def _route(session: Session, case: FailureCase, track: Track) -> None:
    session.add(
        CaseRoute(
            case_id=case.id,
            track=track,
            confidence=0.5,
            evidence={},
            decided_by=Decider.MODEL,
            decider_ref="test",
        )
    )
    session.flush()


def _seed(session: Session) -> list[ReviewItem]:
    routed = _case(session, 1, CaseStatus.ROUTED)
    _route(session, routed, Track.RL)
    waiting = [_case(session, n, CaseStatus.AWAITING_TRIAGE) for n in (2, 3, 4)]
    items = []
    for case in waiting:
        _route(session, case, Track.PRETRAINING_GAP)
        items.append(
            review_repository.add_triage_item(
                session, case=case, title=f"route {case.id}?", artefact={"case_id": case.id}
            )
        )
    _case(session, 5, CaseStatus.OPEN)
    _case(session, 6, CaseStatus.FIXED)
    session.add(Cycle(status=CycleStatus.REJECTED, config={"dry_run": False}))
    promotion = ReviewItem(
        kind=ReviewKind.MODEL_PROMOTION, status=ReviewStatus.PENDING, title="promote?", artefact={}
    )
    session.add(promotion)
    session.commit()
    return [*items, promotion]


def test_status_report_and_command(fresh_engine: Engine, cli: None) -> None:
    with session_factory(fresh_engine)() as session:
        _seed(session)
        # A cycle a run left waiting for its artefacts' review.
        paused = {"step": "artefact-review", "reason": "waiting", "review_items": [41, 42]}
        session.add(Cycle(status=CycleStatus.RUNNING, config={}, summary={"paused": paused}))
        session.commit()
        report = status_report(session)
    assert report.model is None
    assert report.cases == {"open": 1, "routed": 1, "awaiting_triage": 3}
    assert report.tracks == {"pretraining_gap": {"awaiting_triage": 3}, "rl": {"routed": 1}}
    assert report.review_queue == {"triage_case": 3, "model_promotion": 1}
    assert [c.status for c in report.cycles] == ["waiting_for_review", "rejected"]
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["review_queue"]["triage_case"] == 3
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "none promoted yet" in result.output
    assert "pretraining_gap" in result.output
    assert "waits for the review of artefact item(s) 41, 42" in " ".join(result.output.split())


def test_review_decisions(fresh_engine: Engine) -> None:
    with session_factory(fresh_engine)() as session:
        first, second, third, promotion = _seed(session)
        assert [i.id for i in list_queue(session)] == [first.id, second.id, third.id, promotion.id]
        with pytest.raises(ReviewError, match="name the track"):
            approve(session, item_id=first.id, reviewer="alice")
        session.rollback()
        decided = approve(session, item_id=first.id, reviewer="alice", track=Track.RL)
        assert (decided.status, decided.decided_by) == ("approved", "alice")
        assert session.scalar(
            select(CaseRoute.decided_by).where(CaseRoute.case_id == first.case_id)
            .order_by(CaseRoute.id.desc()).limit(1)
        ) == Decider.HUMAN  # fmt: skip
        with pytest.raises(ReviewError, match="already approved by alice"):
            reject(session, item_id=first.id, reviewer="bob", reason="no")
        session.rollback()
        with pytest.raises(ReviewError, match="reason"):
            reject(session, item_id=second.id, reviewer="bob", reason=" ")
        rejected = reject(session, item_id=second.id, reviewer="bob", reason="not a failure")
        assert rejected.status == "rejected"
        status = session.scalar(select(FailureCase.status).where(FailureCase.id == second.case_id))
        assert status == CaseStatus.DISMISSED
        with pytest.raises(ReviewError, match="takes no track"):
            approve(session, item_id=promotion.id, reviewer="carol", track=Track.RL)
        session.rollback()
        assert approve(session, item_id=promotion.id, reviewer="carol").status == "approved"
        shown, trail = show_item(session, item_id=first.id)
        assert shown.artefact == {"case_id": first.case_id}
        assert [t["action"] for t in trail] == ["created", "approved"]
        assert [i.id for i in list_queue(session)] == [third.id]
        assert len(list_queue(session, everything=True)) == 4


def test_review_commands(fresh_engine: Engine, cli: None) -> None:
    with session_factory(fresh_engine)() as session:
        first, second, _, _ = _seed(session)
    result = runner.invoke(app, ["review", "list", "--json", "--kind", "triage_case"])
    assert result.exit_code == 0, result.output
    assert [i["id"] for i in json.loads(result.stdout)] == [first.id, second.id, second.id + 1]
    result = runner.invoke(app, ["review", "list", "--kind", "nope"])
    assert (result.exit_code, "--kind 'nope'" in result.output) == (2, True)
    result = runner.invoke(app, ["review", "show", str(first.id), "--json"])
    assert json.loads(result.stdout)["item"]["kind"] == "triage_case"
    result = runner.invoke(app, ["review", "show", "999999"])
    assert (result.exit_code, "no review item 999999" in result.output) == (2, True)
    result = runner.invoke(app, ["review", "approve", str(first.id), "--by", "alice"])
    assert (result.exit_code, "name the track" in result.output) == (2, True)
    args = ["review", "approve", str(first.id), "--by", "alice", "--track", "rl"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "approved by alice" in result.output
    result = runner.invoke(app, args)
    assert (result.exit_code, "already approved" in result.output) == (2, True)
    args = ["review", "reject", str(second.id), "--by", "bob", "--reason", "noise"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["review", "approve", "1", "--by", "a", "--track", "x"])
    assert (result.exit_code, "--track 'x'" in result.output) == (2, True)
