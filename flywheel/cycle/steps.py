"""The steps of a cycle that every stack shares — open, register the candidate, gate, ask
for the final review, close — and the state they keep in PostgreSQL.

The steps that depend on the stack (attribute, build the tracks' artefacts, run the rounds,
evaluate) come from the project's backend (:mod:`flywheel.cycle.backend`: a team's ports in
:mod:`flywheel.cycle.stack_steps`, or the embedded world's); every backend writes the same
rows, so these steps, the flow and the review's decision (:mod:`flywheel.cycle.finish`)
serve any stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.cycle.config import CycleConfig
from flywheel.cycle.registry import (
    ModelBundle,
    RegistryError,
    ShippedModel,
    bundle,
    current_model,
    register_version,
)
from flywheel.cycle.verdicts import Evaluation, gate
from flywheel.db.models import (
    CaseStatus,
    Component,
    Cycle,
    CycleStatus,
    FailureCase,
    Json,
    ReviewKind,
    ReviewStatus,
    RoundStatus,
    Track,
    TrainingRound,
    TrainingRoundCase,
)
from flywheel.review import repository as review_repository

ROUND_ORDER = (Track.PRETRAINING_GAP, Track.RL, Track.PROMPT_ENHANCER)
"""Rounds run in this order; generator rounds chain (RL fine-tunes the gap round's
generator)."""
RECIPES = {
    Track.PRETRAINING_GAP: "continued_pretraining",
    Track.RL: "flow_grpo",
    Track.PROMPT_ENHANCER: "pe_sft",
}
ARTEFACT_KIND = {
    Track.PRETRAINING_GAP: ReviewKind.AUGMENTATION_BATCH,
    Track.RL: ReviewKind.REWARD_RECALIBRATION,
    Track.PROMPT_ENHANCER: ReviewKind.PROMPT_ENHANCER_DATA,
}
AUTO_REVIEWER = "demo (auto-approve)"
"""Who decides review items in ``auto_approve`` mode (the demo only)."""
ACTOR = "cycle"


def cycle_dir(home: Path, cycle_id: int) -> Path:
    """Where a cycle's rounds write: ``$FLYWHEEL_HOME/cycles/<id>``."""
    return home / "cycles" / str(cycle_id)


def _note(cycle: Cycle, **fields: Any) -> None:
    cycle.summary = {**(cycle.summary or {}), **fields}


def _summary(cycle: Cycle) -> dict[str, Any]:
    return dict(cycle.summary or {})


def cycle_config(cycle: Cycle) -> CycleConfig:
    """The configuration the cycle was started with."""
    return CycleConfig.model_validate(cycle.config)


# ---- 1. open ---------------------------------------------------------------------------------


def open_cycle(
    session: Session, *, config: CycleConfig, shipped: ShippedModel | None
) -> tuple[Cycle, bool]:
    """The cycle to run (call it under the cycle lock) and whether it is resumed; commits.
    A fresh registry gets the stack's ``shipped`` model (the embedded world's base); without
    one, a registry with no serving model is an error (``flywheel models register``)."""
    if config.dry_run:
        raise ValueError("a dry run opens no cycle: plan it (CycleBackend.plan)")
    left = session.scalars(
        select(Cycle).where(Cycle.status == CycleStatus.RUNNING).order_by(Cycle.id).limit(1)
    ).first()
    if left is not None:
        return left, True
    model = current_model(session, shipped=shipped)
    if model is None:
        raise RegistryError(
            "no serving model: register yours with `flywheel models register NAME --generator DIR`"
        )
    cycle = Cycle(
        status=CycleStatus.RUNNING,
        base_model_version_id=model.version_id,
        config=config.model_dump(mode="json"),
        summary={},
    )
    session.add(cycle)
    session.commit()
    return cycle, False


def base_model(session: Session, cycle: Cycle) -> ModelBundle:
    """The model the cycle started from."""
    assert cycle.base_model_version_id is not None
    return bundle(session, version_id=cycle.base_model_version_id)


def add_round(
    session: Session,
    cycle: Cycle,
    *,
    round_: TrainingRound,
    cases: Sequence[FailureCase],
    kind: ReviewKind,
    title: str,
    artefact: dict[str, Any],
    auto_approve: bool,
) -> int:
    """Add a pending round, its cases (now ``in_round``) and its artefact's review item
    (approved at once by the demo reviewer with ``auto_approve``); the item's id. Flushes,
    the caller commits."""
    session.add(round_)
    session.flush()
    for case in cases:
        session.add(TrainingRoundCase(training_round_id=round_.id, case_id=case.id))
        case.status = CaseStatus.IN_ROUND
    item = review_repository.add_item(
        session,
        kind=kind,
        title=title,
        artefact={"track": round_.track.value, "cases": [c.id for c in cases], **artefact},
        actor=ACTOR,
        cycle_id=cycle.id,
        training_round_id=round_.id,
    )
    if auto_approve:
        review_repository.decide_item(
            session,
            item=item,
            status=ReviewStatus.APPROVED,
            actor=AUTO_REVIEWER,
            reason="demo mode: approved without a human",
            at=datetime.now(UTC),
        )
    return item.id


def cycle_rounds(session: Session, cycle: Cycle) -> list[TrainingRound]:
    """The cycle's rounds in the order they run."""
    rounds = session.scalars(select(TrainingRound).where(TrainingRound.cycle_id == cycle.id)).all()
    return sorted(rounds, key=lambda r: ROUND_ORDER.index(r.track))


def round_case_ids(session: Session, round_: TrainingRound) -> list[int]:
    return list(
        session.scalars(
            select(TrainingRoundCase.case_id)
            .where(TrainingRoundCase.training_round_id == round_.id)
            .order_by(TrainingRoundCase.case_id)
        )
    )


def round_output(round_: TrainingRound) -> Path | None:
    """The candidate directory of a succeeded round."""
    metrics = round_.metrics if isinstance(round_.metrics, dict) else {}
    output = metrics.get("output")
    if round_.status != RoundStatus.SUCCEEDED or not output or not Path(output).is_dir():
        return None
    return Path(output)


def _generator_before(session: Session, cycle: Cycle, round_: TrainingRound) -> Path:
    """The generator a generator round starts from: the previous generator round's, else the
    base's."""
    start = base_model(session, cycle).generator
    for earlier in cycle_rounds(session, cycle):
        if earlier.id == round_.id:
            break
        if earlier.track in (Track.PRETRAINING_GAP, Track.RL):
            start = round_output(earlier) or start
    return start


def record_round(
    session: Session, round_id: int, train: Callable[[TrainingRound], Json]
) -> dict[str, Any]:
    """Run ``train`` on a round and record it: a round that already succeeded returns what
    it recorded; otherwise ``running`` (committed) while it trains, then ``succeeded`` with
    the metrics ``train`` returns (``output``: the candidate directory), or ``failed`` with
    the error, which is raised."""
    round_ = session.get(TrainingRound, round_id)
    if round_ is None:
        raise LookupError(f"no training round {round_id}")
    if round_output(round_) is not None:
        return dict(round_.metrics or {})
    round_.status = RoundStatus.RUNNING
    round_.started_at = round_.started_at or datetime.now(UTC)
    session.commit()
    try:
        metrics = train(round_)
    except BaseException as exc:
        session.rollback()
        round_.status = RoundStatus.FAILED
        round_.metrics = {"error": f"{type(exc).__name__}: {exc}"}
        session.commit()
        raise
    round_.status = RoundStatus.SUCCEEDED
    round_.finished_at = datetime.now(UTC)
    round_.metrics = metrics
    session.commit()
    return dict(round_.metrics)


# ---- 5. candidate ----------------------------------------------------------------------------


def register_candidate(session: Session, cycle: Cycle) -> int:
    """Register ``cycle-<id>`` (once): the rounds' components and the base's others."""
    if cycle.candidate_model_version_id is not None:
        return cycle.candidate_model_version_id
    base = base_model(session, cycle)
    components = base.components()
    rounds: dict[Component, int] = {}
    for round_ in cycle_rounds(session, cycle):
        output = round_output(round_)
        if output is None:
            raise RuntimeError(f"round {round_.id} ({round_.track.value}) has not succeeded")
        component = (
            Component.ENHANCER if round_.track == Track.PROMPT_ENHANCER else Component.GENERATOR
        )
        components[component] = output
        rounds[component] = round_.id
    version_id = register_version(
        session,
        name=f"cycle-{cycle.id}",
        components=components,
        description=f"candidate of cycle {cycle.id} (from {base.name})",
        rounds=rounds,
    )
    cycle.candidate_model_version_id = version_id
    session.commit()
    return version_id


# ---- 7. gate (flywheel.cycle.verdicts) and review ------------------------------------------------


def _release_cases(session: Session, cycle: Cycle) -> None:
    """The cycle's cases still ``in_round`` go back to ``routed`` (for the next cycle)."""
    cases = session.scalars(
        select(FailureCase)
        .join(TrainingRoundCase, TrainingRoundCase.case_id == FailureCase.id)
        .join(TrainingRound, TrainingRound.id == TrainingRoundCase.training_round_id)
        .where(TrainingRound.cycle_id == cycle.id, FailureCase.status == CaseStatus.IN_ROUND)
    ).all()
    for case in cases:
        case.status = CaseStatus.ROUTED


def request_review(session: Session, cycle: Cycle) -> CycleStatus:
    """Gate the candidate; passed: a promotion review item and ``awaiting_review`` (decided
    at once by the demo reviewer in ``auto_approve`` mode); failed: the cycle rejected."""
    if cycle.status != CycleStatus.RUNNING:
        return cycle.status
    config = cycle_config(cycle)
    evaluation = Evaluation.model_validate(_summary(cycle)["evaluation"])
    verdict = gate(evaluation, tolerance=config.regression.tolerance)
    _note(cycle, gate=verdict.model_dump(mode="json"))
    if not verdict.passed:
        _release_cases(session, cycle)
        cycle.status = CycleStatus.REJECTED
        cycle.finished_at = datetime.now(UTC)
        _note(cycle, outcome={"decision": "rejected", "by": "gate", "reasons": verdict.reasons})
        session.commit()
        return cycle.status
    base = base_model(session, cycle)
    artefact: Json = {
        "base": base.name,
        "candidate": f"cycle-{cycle.id}",
        "candidate_version_id": cycle.candidate_model_version_id,
        "gate": verdict.model_dump(mode="json"),
        "evaluation": evaluation.model_dump(mode="json"),
        "rounds": {
            r.track.value: {"id": r.id, "recipe": r.recipe, "metrics": r.metrics}
            for r in cycle_rounds(session, cycle)
        },
    }
    item = review_repository.add_item(
        session,
        kind=ReviewKind.MODEL_PROMOTION,
        title=(
            f"Promote cycle-{cycle.id} over {base.name}? {verdict.fixed} failure(s) fixed, "
            f"regression {verdict.regression_delta:+.3f}"
        ),
        artefact=artefact,
        actor=ACTOR,
        cycle_id=cycle.id,
    )
    cycle.status = CycleStatus.AWAITING_REVIEW
    session.commit()
    if config.auto_approve:
        from flywheel.review.service import approve

        approve(
            session,
            item_id=item.id,
            reviewer=AUTO_REVIEWER,
            reason="demo mode: the final review is approved without a human",
        )
        session.refresh(cycle)
    return cycle.status


def close_without_rounds(session: Session, cycle: Cycle) -> CycleStatus:
    """Close a cycle in which no track had a round (``no_rounds``); commits."""
    if cycle.status == CycleStatus.RUNNING:
        cycle.status = CycleStatus.NO_ROUNDS
        cycle.finished_at = datetime.now(UTC)
        session.commit()
    return cycle.status


def pause_cycle(session: Session, cycle_id: int, *, step: str, reason: str) -> None:
    """Leave a cycle whose stack part failed (a judge down, a launcher's process dead, a
    broken dataset file) ``running`` with what stopped it: nothing it finished is lost, and
    the next run resumes it at that step (a round that failed is launched again and resumes
    from its checkpoints). Commits."""
    session.rollback()
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.status != CycleStatus.RUNNING:
        return
    _note(cycle, paused={"step": step, "reason": reason, "at": datetime.now(UTC).isoformat()})
    session.commit()


def resume_cycle(session: Session, cycle: Cycle) -> None:
    """Clear a paused cycle's pause note (it runs again); commits."""
    summary = _summary(cycle)
    if "paused" in summary:
        summary.pop("paused")
        cycle.summary = summary
        session.commit()


def fail_cycle(session: Session, cycle_id: int, *, error: str) -> None:
    """Close a cycle whose step failed for good: rounds not finished and the cycle
    ``failed``, its cases back to ``routed``; commits."""
    session.rollback()
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.status != CycleStatus.RUNNING:
        return
    for round_ in cycle_rounds(session, cycle):
        if round_.status in (RoundStatus.PENDING, RoundStatus.RUNNING):
            round_.status = RoundStatus.FAILED
    _release_cases(session, cycle)
    cycle.status = CycleStatus.FAILED
    cycle.finished_at = datetime.now(UTC)
    _note(cycle, error=error)
    session.commit()
