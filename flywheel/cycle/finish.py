"""The end of a cycle, run when a reviewer decides its ``model_promotion`` item.

Approving promotes the candidate (it serves from now), approves the cycle's artefact items
still pending (audited, "with the promotion"), marks every round case the candidate passes
as ``fixed`` (the others go back to ``routed`` for the next cycle), stamps each failure
cluster whose cases are now all fixed (or dismissed) and turns its fixed cases into active
regression scenarios. Rejecting keeps the serving model, returns the round cases to
``routed`` and rejects the artefact items still pending. Either way the cycle is closed.

It runs inside the decision's transaction: the decision and its effects commit together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.cycle.registry import promote
from flywheel.db.models import (
    CaseStatus,
    Cycle,
    CycleStatus,
    FailureCase,
    FailureCluster,
    RegressionScenario,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    RoundStatus,
    TrainingRound,
    TrainingRoundCase,
)
from flywheel.review import repository


class CycleDecisionError(ValueError):
    """The promotion cannot be decided (the cycle is not waiting, an artefact was rejected)."""


def _round_cases(session: Session, cycle_id: int) -> list[tuple[TrainingRound, FailureCase]]:
    query = (
        select(TrainingRound, FailureCase)
        .join(TrainingRoundCase, TrainingRoundCase.training_round_id == TrainingRound.id)
        .join(FailureCase, FailureCase.id == TrainingRoundCase.case_id)
        .where(TrainingRound.cycle_id == cycle_id)
        .order_by(FailureCase.id)
        .with_for_update(of=FailureCase)
    )
    return [(r, c) for r, c in session.execute(query).all()]


def _evaluation(round_: TrainingRound) -> dict[str, Any]:
    return round_.evaluation if isinstance(round_.evaluation, dict) else {}


def _still_failing(round_: TrainingRound) -> set[int]:
    after = _evaluation(round_).get("after")
    failed = after.get("failed", []) if isinstance(after, dict) else []
    return {int(i) for i in failed if i is not None}


def _specs(rounds: list[TrainingRound]) -> dict[int, Any]:
    """Case id -> what its scenario is judged on (the slice the candidate was evaluated on)."""
    return {
        int(entry["case_id"]): {k: v for k, v in entry.items() if k != "case_id"}
        for round_ in rounds
        for entry in _evaluation(round_).get("slice", [])
    }


def _scenarios(
    session: Session, cycle: Cycle, cases: list[FailureCase], specs: dict[int, Any]
) -> int:
    """Regression scenarios for the clusters now fixed; returns how many were added."""
    clusters = {c.cluster_id for c in cases if c.cluster_id is not None}
    added = 0
    now = datetime.now(UTC)
    for cluster_id in sorted(clusters):
        members = session.scalars(
            select(FailureCase).where(FailureCase.cluster_id == cluster_id)
        ).all()
        live = [m for m in members if m.status != CaseStatus.DISMISSED]
        if not live or any(m.status != CaseStatus.FIXED for m in live):
            continue
        cluster = session.get(FailureCluster, cluster_id)
        assert cluster is not None
        cluster.fixed_at = cluster.fixed_at or now
        known = set(
            session.scalars(
                select(RegressionScenario.source_case_id).where(
                    RegressionScenario.cluster_id == cluster_id
                )
            )
        )
        for member in live:
            if member.id in known:
                continue
            session.add(
                RegressionScenario(
                    cluster_id=cluster_id,
                    source_case_id=member.id,
                    fixed_in_cycle_id=cycle.id,
                    task=member.task,
                    prompt=member.prompt,
                    skill=member.skill,
                    spec=specs.get(member.id),
                )
            )
            added += 1
    return added


def finish_cycle(session: Session, *, item: ReviewItem, approved: bool, reviewer: str) -> None:
    """Act on the promotion decision ``item`` carries (see the module docstring); flushes,
    the caller commits with the decision."""
    if item.kind != ReviewKind.MODEL_PROMOTION or item.cycle_id is None:
        raise CycleDecisionError(f"review item {item.id} is not a model promotion")
    cycle = session.get(Cycle, item.cycle_id, with_for_update=True)
    if cycle is None or cycle.status != CycleStatus.AWAITING_REVIEW:
        state = cycle.status.value if cycle is not None else "missing"
        raise CycleDecisionError(f"cycle {item.cycle_id} is {state}, not awaiting review")
    artefacts = repository.cycle_items(
        session, cycle_id=cycle.id, kinds=repository.ARTEFACT_KINDS, lock=True
    )
    skipped = set(
        session.scalars(
            select(TrainingRound.id).where(
                TrainingRound.cycle_id == cycle.id, TrainingRound.status == RoundStatus.SKIPPED
            )
        )
    )  # a rejected artefact's round that never trained: the candidate is not trained on it
    rejected = [
        a
        for a in artefacts
        if a.status == ReviewStatus.REJECTED and a.training_round_id not in skipped
    ]
    if approved and rejected:
        raise CycleDecisionError(
            f"the cycle's {rejected[0].kind.value} (item {rejected[0].id}) was rejected: "
            "its candidate was trained on it — reject the promotion"
        )
    now = datetime.now(UTC)
    for artefact in artefacts:
        if artefact.status in (ReviewStatus.PENDING, ReviewStatus.CLAIMED):
            repository.decide_item(
                session,
                item=artefact,
                status=ReviewStatus.APPROVED if approved else ReviewStatus.REJECTED,
                actor=reviewer,
                reason=f"decided with the model promotion (item {item.id})",
                at=now,
            )
    fixed: list[FailureCase] = []
    pairs = _round_cases(session, cycle.id)
    for round_, case in pairs:
        if case.status != CaseStatus.IN_ROUND:
            continue
        if approved and case.id not in _still_failing(round_):
            case.status = CaseStatus.FIXED
            fixed.append(case)
        else:
            case.status = CaseStatus.ROUTED
    session.flush()
    scenarios = 0
    if approved:
        assert cycle.candidate_model_version_id is not None
        promote(session, version_id=cycle.candidate_model_version_id)
        specs = _specs(list({r.id: r for r, _ in pairs}.values()))
        scenarios = _scenarios(session, cycle, fixed, specs)
    cycle.status = CycleStatus.PROMOTED if approved else CycleStatus.REJECTED
    cycle.finished_at = now
    cycle.summary = {
        **(cycle.summary or {}),
        "outcome": {
            "decision": "approved" if approved else "rejected",
            "by": reviewer,
            "fixed_cases": len(fixed),
            "regression_scenarios": scenarios,
        },
    }
    session.flush()
