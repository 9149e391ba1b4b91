"""Queries of attribution: the cases to route, what their signals say, routes and triage."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flywheel.db.models import (
    CaseRoute,
    CaseSignal,
    CaseStatus,
    Decider,
    FailureCase,
    Json,
    ReviewAudit,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    Signal,
)


def open_cases(session: Session, *, limit: int | None = None) -> list[FailureCase]:
    """Open cases (never routed), oldest first, locked against a concurrent router."""
    query = (
        select(FailureCase)
        .where(FailureCase.status == CaseStatus.OPEN)
        .order_by(FailureCase.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query))


def case_signals(session: Session, *, case_ids: Sequence[int]) -> dict[int, list[Signal]]:
    """Each case's linked signals, oldest first."""
    rows = session.execute(
        select(CaseSignal.case_id, Signal)
        .join(Signal, Signal.id == CaseSignal.signal_id)
        .where(CaseSignal.case_id.in_(case_ids))
        .order_by(Signal.id)
    )
    out: dict[int, list[Signal]] = {}
    for case_id, signal in rows:
        out.setdefault(case_id, []).append(signal)
    return out


def get_case(session: Session, *, case_id: int, lock: bool = False) -> FailureCase | None:
    query = select(FailureCase).where(FailureCase.id == case_id)
    return session.scalar(query.with_for_update() if lock else query)


def latest_route(
    session: Session, *, case_id: int, decided_by: Decider | None = None
) -> CaseRoute | None:
    """The case's newest route (of that decider)."""
    query = select(CaseRoute).where(CaseRoute.case_id == case_id)
    if decided_by is not None:
        query = query.where(CaseRoute.decided_by == decided_by)
    return session.scalar(query.order_by(CaseRoute.created_at.desc(), CaseRoute.id.desc()).limit(1))


def add_route(
    session: Session,
    *,
    case_id: int,
    track: str,
    confidence: float,
    evidence: Json,
    decided_by: Decider,
    decider_ref: str,
    reason: str | None,
) -> CaseRoute:
    route = CaseRoute(
        case_id=case_id,
        track=track,
        confidence=confidence,
        evidence=evidence,
        decided_by=decided_by,
        decider_ref=decider_ref,
        reason=reason,
    )
    session.add(route)
    session.flush()
    return route


def human_routes(session: Session) -> list[tuple[CaseRoute, CaseRoute | None]]:
    """Per case a human routed, its newest human route and the newest model route before it
    (whose evidence holds the case's features)."""
    newest = (
        select(CaseRoute.case_id, func.max(CaseRoute.id).label("id"))
        .where(CaseRoute.decided_by == Decider.HUMAN)
        .group_by(CaseRoute.case_id)
        .subquery()
    )
    humans = list(
        session.scalars(
            select(CaseRoute).join(newest, CaseRoute.id == newest.c.id).order_by(CaseRoute.id)
        )
    )
    out = []
    for human in humans:
        model = session.scalar(
            select(CaseRoute)
            .where(
                CaseRoute.case_id == human.case_id,
                CaseRoute.decided_by == Decider.MODEL,
                CaseRoute.id < human.id,
            )
            .order_by(CaseRoute.id.desc())
            .limit(1)
        )
        out.append((human, model))
    return out


def add_triage_item(
    session: Session, *, case: FailureCase, title: str, artefact: Json
) -> ReviewItem:
    item = ReviewItem(
        kind=ReviewKind.TRIAGE_CASE,
        status=ReviewStatus.PENDING,
        title=title,
        artefact=artefact,
        case_id=case.id,
        cluster_id=case.cluster_id,
    )
    session.add(item)
    session.flush()
    session.add(
        ReviewAudit(
            review_item_id=item.id,
            actor="attribution",
            action="created",
            after={"status": item.status.value},
        )
    )
    return item


def pending_triage(session: Session, *, case_id: int) -> list[ReviewItem]:
    """The case's triage items still waiting for a decision (locked)."""
    query = (
        select(ReviewItem)
        .where(
            ReviewItem.case_id == case_id,
            ReviewItem.kind == ReviewKind.TRIAGE_CASE,
            ReviewItem.status.in_([ReviewStatus.PENDING, ReviewStatus.CLAIMED]),
        )
        .with_for_update()
    )
    return list(session.scalars(query))


def decide_item(
    session: Session,
    *,
    item: ReviewItem,
    status: ReviewStatus,
    actor: str,
    reason: str | None,
    at: datetime,
    edits: Json | None = None,
) -> None:
    before = {"status": item.status.value}
    item.status = status
    item.decided_by = actor
    item.decided_at = at
    item.decision_reason = reason
    item.edits = edits
    session.add(
        ReviewAudit(
            review_item_id=item.id,
            actor=actor,
            action=status.value,
            before=before,
            after={"status": status.value, "edits": edits},
        )
    )
