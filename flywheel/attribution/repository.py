"""Queries of attribution: the cases to route, what their signals say, routes and triage."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flywheel.db.models import (
    CaseRoute,
    CaseSignal,
    CaseStatus,
    Decider,
    FailureCase,
    Json,
    Signal,
)


def open_cases(
    session: Session, *, limit: int | None = None, after_id: int = 0
) -> list[FailureCase]:
    """Open cases (never routed) after ``after_id``, oldest first (no lock: read, then
    :func:`lock_still_open` before writing)."""
    query = (
        select(FailureCase)
        .where(FailureCase.status == CaseStatus.OPEN, FailureCase.id > after_id)
        .order_by(FailureCase.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def lock_still_open(session: Session, *, case_ids: Sequence[int]) -> dict[int, FailureCase]:
    """Of ``case_ids``, the cases still open, locked for this transaction (a case another
    router or a human holds or has routed meanwhile is left out)."""
    query = (
        select(FailureCase)
        .where(FailureCase.id.in_(case_ids), FailureCase.status == CaseStatus.OPEN)
        .with_for_update(skip_locked=True)
    )
    return {case.id: case for case in session.scalars(query)}


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
