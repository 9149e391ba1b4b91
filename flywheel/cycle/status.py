"""What ``flywheel status`` shows — the serving model, open cases per track, the review
queue and the last cycles — and one cycle's lineage (the dashboard's Cycles page)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from flywheel.cycle.registry import current_model
from flywheel.cycle.steps import run_state
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    Checkpoint,
    Cycle,
    FailureCase,
    ModelVersion,
    ReviewItem,
    ReviewStatus,
    TrainingRound,
    TrainingRoundCase,
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
    """The cycle's status; for a running cycle a run left stopped, ``paused`` (a failing
    part) or ``waiting_for_review`` (artefacts wait for a reviewer before their rounds)."""
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
    model = current_model(session)
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
                status=run_state(c),
                started_at=c.started_at,
                finished_at=c.finished_at,
                summary=c.summary if isinstance(c.summary, dict) else None,
            )
            for c in last
        ],
    )


class RoundLineage(_Frozen):
    id: int
    track: str
    recipe: str
    status: str
    cases: list[int]
    data: dict[str, object]
    """The round's data manifest in brief (counts, concepts, categories)."""
    stages: dict[str, object]
    """Per training stage: steps, losses, where it resumed from."""
    failure_rate_before: float | None
    failure_rate_after: float | None
    checkpoints: list[str]
    """The candidate components this round produced (``component: uri``)."""


class CycleLineage(_Frozen):
    """From cases to data to checkpoints to the decision, for one cycle."""

    id: int
    status: str
    base: str | None
    candidate: str | None
    started_at: datetime
    finished_at: datetime | None
    rounds: list[RoundLineage]
    regression: dict[str, object] | None
    gate: dict[str, object] | None
    outcome: dict[str, object] | None
    review_items: list[tuple[int, str, str]]
    """(id, kind, status) of the cycle's review items."""


def _brief(manifest: object) -> dict[str, object]:
    if not isinstance(manifest, dict):
        return {}
    plan = manifest.get("plan")
    if isinstance(plan, dict):
        return {
            "concepts": plan.get("concepts"),
            "retrieved": len(plan.get("retrieved") or []),
            "synthesized": plan.get("synthesized"),
            "replay": plan.get("replay"),
            "mixture_weight": plan.get("mixture_weight"),
        }
    preferences = manifest.get("preferences")
    if isinstance(preferences, dict):  # the world's RL round: people's pairs, its prompts
        return {
            "preference_pairs": preferences.get("pairs"),
            "by_source": preferences.get("by_source"),
            "agreement": preferences.get("agreement"),
            "prompts": len(manifest.get("prompts") or []),
        }
    return {k: manifest[k] for k in ("concepts", "pairs", "user_worded", "echo") if k in manifest}


def cycle_lineage(session: Session, *, cycle_id: int) -> CycleLineage | None:
    """The cycle's record, read for people (None: no such cycle)."""
    cycle = session.get(Cycle, cycle_id)
    if cycle is None:
        return None
    names = dict(
        session.execute(
            select(ModelVersion.id, ModelVersion.name).where(
                ModelVersion.id.in_(
                    [
                        i
                        for i in (cycle.base_model_version_id, cycle.candidate_model_version_id)
                        if i is not None
                    ]
                )
            )
        ).all()
    )
    rounds = session.scalars(
        select(TrainingRound).where(TrainingRound.cycle_id == cycle_id).order_by(TrainingRound.id)
    ).all()
    lines = []
    for round_ in rounds:
        cases = list(
            session.scalars(
                select(TrainingRoundCase.case_id)
                .where(TrainingRoundCase.training_round_id == round_.id)
                .order_by(TrainingRoundCase.case_id)
            )
        )
        checkpoints = session.scalars(
            select(Checkpoint).where(Checkpoint.training_round_id == round_.id)
        ).all()
        evaluation = round_.evaluation if isinstance(round_.evaluation, dict) else {}
        metrics = round_.metrics if isinstance(round_.metrics, dict) else {}
        before, after = evaluation.get("before"), evaluation.get("after")
        lines.append(
            RoundLineage(
                id=round_.id,
                track=round_.track.value,
                recipe=round_.recipe,
                status=round_.status.value,
                cases=cases,
                data=_brief(round_.data_manifest),
                stages=dict(metrics.get("stages") or {}),
                failure_rate_before=before.get("failure_rate") if before else None,
                failure_rate_after=after.get("failure_rate") if after else None,
                checkpoints=[f"{c.component.value}: {c.uri}" for c in checkpoints],
            )
        )
    summary = cycle.summary if isinstance(cycle.summary, dict) else {}
    overall = summary.get("evaluation")
    items = session.execute(
        select(ReviewItem.id, ReviewItem.kind, ReviewItem.status)
        .where(ReviewItem.cycle_id == cycle_id)
        .order_by(ReviewItem.id)
    ).all()
    return CycleLineage(
        id=cycle.id,
        status=cycle.status.value,
        base=names.get(cycle.base_model_version_id or 0),
        candidate=names.get(cycle.candidate_model_version_id or 0),
        started_at=cycle.started_at,
        finished_at=cycle.finished_at,
        rounds=lines,
        regression=overall.get("regression") if isinstance(overall, dict) else None,
        gate=summary.get("gate"),
        outcome=summary.get("outcome"),
        review_items=[(i, k.value, s.value) for i, k, s in items],
    )
