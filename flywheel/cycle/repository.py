"""The cycle's reads of cases, routes, clusters, signals and scenarios (SQLAlchemy 2
``select()`` in keyword-only functions)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from statistics import fmean

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.attribution.repository import case_signals
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    FailureCase,
    FailureCluster,
    RegressionScenario,
    Signal,
    SignalKind,
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


def top_clusters(session: Session, *, cases: Sequence[FailureCase]) -> list[tuple[str, int]]:
    """The theme labels of ``cases``, most common first (three at most)."""
    ids = [c.cluster_id for c in cases if c.cluster_id is not None]
    labels = cluster_labels(session, cluster_ids=ids)
    return Counter(labels[i] for i in ids).most_common(3)


def mean_confidence(session: Session, *, cases: Sequence[FailureCase]) -> float | None:
    """The mean confidence of the routes of ``cases`` (None: no route)."""
    values = session.scalars(
        select(CaseRoute.confidence).where(CaseRoute.case_id.in_([c.id for c in cases]))
    ).all()
    return fmean(values) if values else None


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


def compared_case_ids(session: Session) -> list[int]:
    """The cases whose prompt has pairwise feedback (people compared two images of it)."""
    compared = (
        select(Signal.prompt)
        .where(Signal.source == SignalSource.FEEDBACK, Signal.kind == SignalKind.PAIRWISE)
        .distinct()
    )
    return list(
        session.scalars(
            select(FailureCase.id).where(FailureCase.prompt.in_(compared)).order_by(FailureCase.id)
        )
    )


def active_scenarios(session: Session) -> list[RegressionScenario]:
    """The regression scenarios still in force, oldest first."""
    return list(
        session.scalars(
            select(RegressionScenario)
            .where(RegressionScenario.active.is_(True))
            .order_by(RegressionScenario.id)
        )
    )


__all__ = [
    "active_scenarios",
    "case_signals",
    "cluster_labels",
    "compared_case_ids",
    "feedback_for_prompts",
    "latest_routes",
    "mean_confidence",
    "top_clusters",
]
