"""What people look at: failure cases with their current route, clusters with their trend,
signal volume over time — pages for the dashboard, paginated on the server.

Queries live in the ``*_query`` helpers (SQLAlchemy 2 ``select()``); the functions return
pydantic rows, never ORM objects.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, and_, exists, func, select
from sqlalchemy.dialects.postgresql import aggregate_order_by, distinct_on
from sqlalchemy.orm import Session

from flywheel.db.models import (
    CaseRoute,
    CaseSignal,
    CaseStatus,
    FailureCase,
    FailureCluster,
    ModelVersion,
    Signal,
    SignalSource,
    Track,
)


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaseRow(_Row):
    id: int
    status: str
    prompt: str
    track: str | None
    confidence: float | None
    decided_by: str | None
    cluster_id: int | None
    cluster: str | None
    model_version: str | None
    signals: int
    image_uri: str | None
    first_seen_at: datetime
    last_seen_at: datetime


class CaseFilters(_Row):
    """Which cases a page shows (None: any)."""

    track: Track | None = None
    status: CaseStatus | None = None
    cluster_id: int | None = None
    model_version: str | None = None
    source: SignalSource | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    since: datetime | None = None


class CasePage(_Row):
    items: list[CaseRow]
    next_before: int | None
    """Pass as ``before_id`` for the next (older) page; None on the last one."""


class SignalLine(_Row):
    id: int
    source: str
    kind: str
    app: str
    image_uri: str | None
    passed: bool | None
    thumbs_up: bool | None
    rating: int | None
    flags: list[str] | None
    comment: str | None
    scores: dict[str, float] | None
    received_at: datetime


class RouteLine(_Row):
    track: str
    confidence: float
    decided_by: str
    decider_ref: str
    reason: str | None
    evidence: dict[str, Any]
    created_at: datetime


class CaseDetail(_Row):
    case: CaseRow
    routes: list[RouteLine]
    """Newest first: the current route, then the ones it replaced."""
    signals: list[SignalLine]


class ClusterRow(_Row):
    id: int
    label: str
    cases: int
    open: int
    fixed_at: datetime | None
    per_day: dict[str, int]
    """Cases first seen per day (ISO date), the last ``days`` days."""
    examples: list[str]
    """Image URIs of a few of its cases."""


def _latest_routes() -> Any:
    return (
        select(
            CaseRoute.case_id,
            CaseRoute.track,
            CaseRoute.confidence,
            CaseRoute.decided_by,
        )
        .ext(distinct_on(CaseRoute.case_id))
        .order_by(CaseRoute.case_id, CaseRoute.id.desc())
        .subquery()
    )


def _cases_query(filters: CaseFilters) -> Select[Any]:
    route = _latest_routes()
    query = (
        select(
            FailureCase,
            route.c.track,
            route.c.confidence,
            route.c.decided_by,
            FailureCluster.label,
            ModelVersion.name,
        )
        .outerjoin(route, route.c.case_id == FailureCase.id)
        .outerjoin(FailureCluster, FailureCluster.id == FailureCase.cluster_id)
        .outerjoin(ModelVersion, ModelVersion.id == FailureCase.model_version_id)
    )
    if filters.track is not None:
        query = query.where(route.c.track == filters.track)
    if filters.status is not None:
        query = query.where(FailureCase.status == filters.status)
    if filters.cluster_id is not None:
        query = query.where(FailureCase.cluster_id == filters.cluster_id)
    if filters.model_version is not None:
        query = query.where(ModelVersion.name == filters.model_version)
    if filters.min_confidence is not None:
        query = query.where(route.c.confidence >= filters.min_confidence)
    if filters.max_confidence is not None:
        query = query.where(route.c.confidence <= filters.max_confidence)
    if filters.since is not None:
        query = query.where(FailureCase.last_seen_at >= filters.since)
    if filters.source is not None:
        query = query.where(
            exists(
                select(CaseSignal.signal_id)
                .join(Signal, Signal.id == CaseSignal.signal_id)
                .where(CaseSignal.case_id == FailureCase.id, Signal.source == filters.source)
            )
        )
    return query


def _case_row(row: Any) -> CaseRow:
    case, track, confidence, decided_by, label, version = row
    return CaseRow(
        id=case.id,
        status=case.status.value,
        prompt=case.prompt,
        track=track.value if track is not None else None,
        confidence=confidence,
        decided_by=decided_by.value if decided_by is not None else None,
        cluster_id=case.cluster_id,
        cluster=label,
        model_version=version,
        signals=case.signal_count,
        image_uri=case.image_uri,
        first_seen_at=case.first_seen_at,
        last_seen_at=case.last_seen_at,
    )


def case_page(
    session: Session, *, filters: CaseFilters, before_id: int | None = None, limit: int = 25
) -> CasePage:
    """Cases matching ``filters``, newest first, ``limit`` at a time."""
    if not 1 <= limit <= 500:
        raise ValueError(f"limit must be in 1..500, got {limit}")
    query = _cases_query(filters)
    if before_id is not None:
        query = query.where(FailureCase.id < before_id)
    rows = session.execute(query.order_by(FailureCase.id.desc()).limit(limit + 1)).all()
    items = [_case_row(r) for r in rows[:limit]]
    return CasePage(items=items, next_before=items[-1].id if len(rows) > limit else None)


def case_detail(session: Session, *, case_id: int) -> CaseDetail | None:
    """One case, its routes (evidence included) and its signals."""
    row = session.execute(_cases_query(CaseFilters()).where(FailureCase.id == case_id)).first()
    if row is None:
        return None
    routes = session.scalars(
        select(CaseRoute).where(CaseRoute.case_id == case_id).order_by(CaseRoute.id.desc())
    ).all()
    signals = session.scalars(
        select(Signal)
        .join(CaseSignal, CaseSignal.signal_id == Signal.id)
        .where(CaseSignal.case_id == case_id)
        .order_by(Signal.id)
        .limit(200)
    ).all()
    return CaseDetail(
        case=_case_row(row),
        routes=[
            RouteLine(
                track=r.track.value,
                confidence=r.confidence,
                decided_by=r.decided_by.value,
                decider_ref=r.decider_ref,
                reason=r.reason,
                evidence=r.evidence if isinstance(r.evidence, dict) else {},
                created_at=r.created_at,
            )
            for r in routes
        ],
        signals=[
            SignalLine(
                id=s.id,
                source=s.source.value,
                kind=s.kind.value,
                app=s.app,
                image_uri=s.image_uri,
                passed=s.passed,
                thumbs_up=s.thumbs_up,
                rating=s.rating,
                flags=s.flags,
                comment=s.comment,
                scores=s.scores,
                received_at=s.received_at,
            )
            for s in signals
        ],
    )


def clusters(session: Session, *, days: int = 14, limit: int = 50) -> list[ClusterRow]:
    """The largest clusters with their open count, daily trend and example images."""
    since = datetime.now(UTC) - timedelta(days=days)
    sizes = session.execute(
        select(
            FailureCluster.id,
            FailureCluster.label,
            FailureCluster.fixed_at,
            func.count(FailureCase.id),
            func.count(FailureCase.id).filter(
                FailureCase.status.in_(
                    [CaseStatus.OPEN, CaseStatus.ROUTED, CaseStatus.AWAITING_TRIAGE]
                )
            ),
            func.array_agg(aggregate_order_by(FailureCase.image_uri, FailureCase.id.desc())).filter(
                FailureCase.image_uri.is_not(None)
            ),
        )
        .join(FailureCase, FailureCase.cluster_id == FailureCluster.id)
        .group_by(FailureCluster.id)
        .order_by(func.count(FailureCase.id).desc(), FailureCluster.id)
        .limit(limit)
    ).all()
    ids = [row[0] for row in sizes]
    trend: dict[int, dict[str, int]] = defaultdict(dict)
    day = func.date_trunc("day", FailureCase.first_seen_at)
    for cluster_id, when, count in session.execute(
        select(FailureCase.cluster_id, day, func.count())
        .where(and_(FailureCase.cluster_id.in_(ids), FailureCase.first_seen_at >= since))
        .group_by(FailureCase.cluster_id, day)
    ):
        trend[cluster_id][when.date().isoformat()] = count
    return [
        ClusterRow(
            id=cid,
            label=label,
            cases=size,
            open=open_,
            fixed_at=fixed_at,
            per_day=dict(sorted(trend[cid].items())),
            examples=list(images or [])[:4],
        )
        for cid, label, fixed_at, size, open_, images in sizes
    ]


def signal_volume(session: Session, *, days: int = 30) -> dict[str, dict[str, int]]:
    """Signals received per day (ISO date) and source, the last ``days`` days."""
    since = datetime.now(UTC) - timedelta(days=days)
    day = func.date_trunc("day", Signal.received_at)
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for when, source, count in session.execute(
        select(day, Signal.source, func.count())
        .where(Signal.received_at >= since)
        .group_by(day, Signal.source)
        .order_by(day)
    ):
        out[when.date().isoformat()][source.value] = count
    return dict(out)


def model_versions(session: Session) -> list[str]:
    """Names of the model versions cases were found on."""
    return list(
        session.scalars(
            select(ModelVersion.name)
            .where(
                exists(
                    select(FailureCase.id).where(FailureCase.model_version_id == ModelVersion.id)
                )
            )
            .order_by(ModelVersion.name)
        )
    )
