"""The cycle's reads of cases, routes, clusters, signals and scenarios (SQLAlchemy 2
``select()`` in keyword-only functions)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.db.models import (
    CaseRoute,
    CaseSignal,
    CaseStatus,
    FailureCase,
    FailureCluster,
    RegressionScenario,
    Signal,
    SignalSource,
)


def latest_routes(
    session: Session, *, case_ids: Sequence[int] | None = None
) -> list[tuple[CaseRoute, FailureCase]]:
    """Each case's current route: the routed cases' (``case_ids`` None) or those cases'."""
    query = select(CaseRoute, FailureCase).join(FailureCase, FailureCase.id == CaseRoute.case_id)
    if case_ids is None:
        query = query.where(FailureCase.status == CaseStatus.ROUTED)
    else:
        query = query.where(FailureCase.id.in_(case_ids))
    rows = session.execute(query.order_by(CaseRoute.case_id, CaseRoute.id.desc())).all()
    latest: dict[int, tuple[CaseRoute, FailureCase]] = {}
    for route, case in rows:
        latest.setdefault(case.id, (route, case))
    return list(latest.values())


def cluster_labels(session: Session, *, cluster_ids: Sequence[int]) -> dict[int, str]:
    """Cluster id -> its theme label."""
    rows = session.execute(
        select(FailureCluster.id, FailureCluster.label).where(FailureCluster.id.in_(cluster_ids))
    ).all()
    return {int(cluster_id): str(label) for cluster_id, label in rows}


def case_signals(session: Session, *, case_ids: Sequence[int]) -> dict[int, list[Signal]]:
    """Each case's linked signals, oldest first."""
    rows = session.execute(
        select(CaseSignal.case_id, Signal)
        .join(Signal, Signal.id == CaseSignal.signal_id)
        .where(CaseSignal.case_id.in_(case_ids))
        .order_by(Signal.id)
    ).all()
    out: dict[int, list[Signal]] = {}
    for case_id, signal in rows:
        out.setdefault(case_id, []).append(signal)
    return out


def feedback_for_prompts(session: Session, *, prompts: Sequence[str]) -> dict[str, list[Signal]]:
    """Every feedback signal on each of ``prompts`` (liked and pairwise ones included: only
    failures are linked to cases), oldest first."""
    rows = session.scalars(
        select(Signal)
        .where(Signal.source == SignalSource.FEEDBACK, Signal.prompt.in_(list(set(prompts))))
        .order_by(Signal.id)
    ).all()
    out: dict[str, list[Signal]] = {}
    for signal in rows:
        out.setdefault(signal.prompt, []).append(signal)
    return out


def active_scenarios(session: Session) -> list[RegressionScenario]:
    """The regression scenarios still in force, oldest first."""
    return list(
        session.scalars(
            select(RegressionScenario)
            .where(RegressionScenario.active.is_(True))
            .order_by(RegressionScenario.id)
        )
    )
