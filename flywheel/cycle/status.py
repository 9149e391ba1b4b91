"""What ``flywheel status`` shows: the serving model, open cases per track, the review
queue and the last cycles."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from flywheel.cycle.registry import current_model
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    Cycle,
    FailureCase,
    ReviewItem,
    ReviewStatus,
)

_OPEN = (CaseStatus.OPEN, CaseStatus.ROUTED, CaseStatus.AWAITING_TRIAGE, CaseStatus.IN_ROUND)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServingModel(_Frozen):
    version: str
    generator: str
    enhancer: str
    reward: str


class CycleLine(_Frozen):
    id: int
    status: str
    started_at: datetime
    finished_at: datetime | None
    summary: dict[str, object] | None


class StatusReport(_Frozen):
    model: ServingModel | None
    """None: nothing promoted yet (the first cycle registers the shipped base)."""
    cases: dict[str, int]
    """Cases not yet fixed or dismissed, by status."""
    tracks: dict[str, dict[str, int]]
    """Routed, awaiting-triage and in-round cases by their current track."""
    review_queue: dict[str, int]
    """Pending or claimed review items by kind."""
    cycles: list[CycleLine]
    """The last cycles, newest first."""


def status_report(session: Session, *, cycles: int = 5) -> StatusReport:
    """Read the status (nothing is written)."""
    model = current_model(session, register_base=False)
    by_status = dict(
        session.execute(
            select(FailureCase.status, func.count())
            .where(FailureCase.status.in_(_OPEN))
            .group_by(FailureCase.status)
        ).all()
    )
    latest = (
        select(CaseRoute.case_id, CaseRoute.track)
        .ext(distinct_on(CaseRoute.case_id))
        .order_by(CaseRoute.case_id, CaseRoute.id.desc())
        .subquery()
    )
    rows = session.execute(
        select(latest.c.track, FailureCase.status)
        .join(FailureCase, FailureCase.id == latest.c.case_id)
        .where(FailureCase.status.in_(_OPEN[1:]))
    ).all()
    tracks: dict[str, Counter[str]] = {}
    for track, status in rows:
        tracks.setdefault(track.value, Counter())[status.value] += 1
    queue = dict(
        session.execute(
            select(ReviewItem.kind, func.count())
            .where(ReviewItem.status.in_([ReviewStatus.PENDING, ReviewStatus.CLAIMED]))
            .group_by(ReviewItem.kind)
        ).all()
    )
    last = session.scalars(select(Cycle).order_by(Cycle.id.desc()).limit(cycles)).all()
    return StatusReport(
        model=ServingModel(
            version=model.name,
            generator=str(model.generator),
            enhancer=str(model.enhancer),
            reward=str(model.reward),
        )
        if model is not None
        else None,
        cases={s.value: n for s, n in by_status.items()},
        tracks={t: dict(c) for t, c in sorted(tracks.items())},
        review_queue={k.value: n for k, n in queue.items()},
        cycles=[
            CycleLine(
                id=c.id,
                status=c.status.value,
                started_at=c.started_at,
                finished_at=c.finished_at,
                summary=c.summary if isinstance(c.summary, dict) else None,
            )
            for c in last
        ],
    )
