"""The steps of a cycle that every stack shares — open, review the artefacts before their
rounds train, register the candidate, gate, ask for the final review, close — and the state
they keep in PostgreSQL.

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

from pydantic import BaseModel, ConfigDict
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
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    RoundStatus,
    Track,
    TrainingRound,
    TrainingRoundCase,
)
from flywheel.review import repository as review_repository
from flywheel.review.edits import EDITABLE, ArtefactEdits, EditVocabulary

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
ARTEFACT_KINDS = review_repository.ARTEFACT_KINDS
AUTO_REVIEWER = "demo (auto-approve)"
"""Who decides review items in ``auto_approve`` mode (the demo only)."""
ACTOR = "cycle"
ARTEFACT_REVIEW = "artefact-review"
"""The flow step that waits for the artefacts' decisions before the rounds train."""
PAUSED = "paused"
"""A running cycle's state when a part of the stack failed (the next run resumes it)."""
WAITING_FOR_REVIEW = "waiting_for_review"
"""A running cycle's state while artefacts wait for a reviewer (the next run goes on)."""


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
    editable: EditVocabulary,
) -> int:
    """Add a pending round, its cases (now ``in_round``) and its artefact's review item
    (its artefact declaring the edits it takes: ``editable``); the item's id. The item is
    decided before the round trains (:func:`review_artefacts`). Flushes, the caller
    commits."""
    session.add(round_)
    session.flush()
    for case in cases:
        session.add(TrainingRoundCase(training_round_id=round_.id, case_id=case.id))
        case.status = CaseStatus.IN_ROUND
    item = review_repository.add_item(
        session,
        kind=kind,
        title=title,
        artefact={
            "track": round_.track.value,
            "cases": [c.id for c in cases],
            **artefact,
            EDITABLE: editable.model_dump(mode="json", exclude_none=True),
        },
        actor=ACTOR,
        cycle_id=cycle.id,
        training_round_id=round_.id,
    )
    return item.id


def cycle_rounds(session: Session, cycle: Cycle, *, skipped: bool = False) -> list[TrainingRound]:
    """The cycle's rounds in the order they run; those skipped (their artefact rejected)
    only with ``skipped``."""
    query = select(TrainingRound).where(TrainingRound.cycle_id == cycle.id)
    if not skipped:
        query = query.where(TrainingRound.status != RoundStatus.SKIPPED)
    rounds = session.scalars(query).all()
    return sorted(rounds, key=lambda r: ROUND_ORDER.index(r.track))


# ---- 4. the artefacts' review, before the rounds ------------------------------------------------


class WaitingItem(BaseModel):
    """An artefact's review item not decided yet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item: int
    kind: str
    track: str
    round: int


class ArtefactReview(BaseModel):
    """Where the reviews of a cycle's artefacts stand (what :func:`review_artefacts` found)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: list[tuple[str, int]]
    """(track, round id) of the rounds to train, in the order they run: their artefacts were
    approved (or the round trained already)."""
    waiting: list[WaitingItem]
    """Items still to decide: no round trains while one waits."""
    skipped: dict[str, int]
    """Track -> round skipped because a reviewer rejected its artefact."""
    auto_approved: list[WaitingItem]
    """Items the demo reviewer approved in this call (``auto_approve``)."""


def artefact_item(session: Session, round_: TrainingRound) -> ReviewItem | None:
    """The review item of the round's artefact (None: a round recorded without one)."""
    return session.scalars(
        select(ReviewItem)
        .where(ReviewItem.training_round_id == round_.id, ReviewItem.kind.in_(ARTEFACT_KINDS))
        .order_by(ReviewItem.id)
        .limit(1)
    ).first()


def _waiting(item: ReviewItem, round_: TrainingRound) -> WaitingItem:
    return WaitingItem(
        item=item.id, kind=item.kind.value, track=round_.track.value, round=round_.id
    )


def _skip_round(session: Session, round_: TrainingRound, item: ReviewItem) -> None:
    """The round never trains: ``skipped``, the rejection recorded, its cases back to
    ``routed`` (the next cycle's)."""
    round_.status = RoundStatus.SKIPPED
    round_.finished_at = datetime.now(UTC)
    round_.metrics = {
        "skipped": {
            "item": item.id,
            "by": item.decided_by,
            "reason": item.decision_reason,
        }
    }
    cases = session.scalars(
        select(FailureCase)
        .join(TrainingRoundCase, TrainingRoundCase.case_id == FailureCase.id)
        .where(
            TrainingRoundCase.training_round_id == round_.id,
            FailureCase.status == CaseStatus.IN_ROUND,
        )
    ).all()
    for case in cases:
        case.status = CaseStatus.ROUTED


def review_artefacts(session: Session, cycle: Cycle) -> ArtefactReview:
    """The decisions on the cycle's artefacts, acted on before any round trains: a rejected
    artefact's round is skipped (:func:`_skip_round`); an approved one's round trains (with
    the reviewer's edits: :func:`edit_round_data`); items not decided yet are listed as
    waiting. In ``auto_approve`` mode (the demo) the demo reviewer approves them here, each
    listed. Records per track the decision in the summary (``artefacts``); commits."""
    auto_approved: list[WaitingItem] = []
    if cycle_config(cycle).auto_approve:
        from flywheel.review.service import OPEN_STATUSES, approve

        for round_ in cycle_rounds(session, cycle):
            item = artefact_item(session, round_)
            if item is not None and item.status in OPEN_STATUSES:
                approve(
                    session,
                    item_id=item.id,
                    reviewer=AUTO_REVIEWER,
                    reason="demo mode: approved without a human",
                )
                auto_approved.append(_waiting(item, round_))
        session.refresh(cycle)
    rounds: list[tuple[str, int]] = []
    waiting: list[WaitingItem] = []
    skipped: dict[str, int] = {}
    decisions: dict[str, Any] = {}
    for round_ in cycle_rounds(session, cycle, skipped=True):
        item = artefact_item(session, round_)
        if item is not None:
            decisions[round_.track.value] = {
                "item": item.id,
                "kind": item.kind.value,
                "decision": item.status.value,
                "by": item.decided_by,
                "edits": item.edits,
            }
        if round_.status == RoundStatus.SKIPPED:
            skipped[round_.track.value] = round_.id
        elif item is None or round_.status == RoundStatus.SUCCEEDED:
            rounds.append((round_.track.value, round_.id))  # decided already, or no item
        elif item.status == ReviewStatus.REJECTED:
            _skip_round(session, round_, item)
            skipped[round_.track.value] = round_.id
        elif item.status == ReviewStatus.APPROVED:
            rounds.append((round_.track.value, round_.id))
        else:
            waiting.append(_waiting(item, round_))
    _note(cycle, artefacts=decisions)
    session.commit()
    return ArtefactReview(
        rounds=rounds, waiting=waiting, skipped=skipped, auto_approved=auto_approved
    )


def waiting_reason(waiting: Sequence[WaitingItem]) -> str:
    """One line naming the artefact items a cycle waits for."""
    items = ", ".join(f"#{w.item} {w.kind} ({w.track})" for w in waiting)
    return f"waiting for the review of {len(waiting)} artefact(s) before their rounds: {items}"


def edit_round_data(
    session: Session,
    round_id: int,
    apply: Callable[[TrainingRound, ArtefactEdits], dict[str, Any]],
) -> None:
    """Before a pending round trains: the edits its artefact was approved with, applied once
    — ``apply`` (the backend's) writes the edited files next to the reviewed ones and
    returns the round's new data manifest, which records the edits, who made them and what
    they replaced (``edits``). A round whose manifest records them, or that started, is left
    as it is. Commits."""
    round_ = session.get(TrainingRound, round_id)
    if round_ is None:
        raise LookupError(f"no training round {round_id}")
    data = dict(round_.data_manifest) if isinstance(round_.data_manifest, dict) else {}
    if "edits" in data or round_.status != RoundStatus.PENDING:
        return
    item = artefact_item(session, round_)
    if item is None or item.status != ReviewStatus.APPROVED or not item.edits:
        return
    edits = ArtefactEdits.model_validate(item.edits)
    if edits.is_empty():
        return
    edited = apply(round_, edits)
    replaced = {k: v for k, v in data.items() if k in edited and edited[k] != v}
    edited["edits"] = {
        "applied": edits.model_dump(mode="json", exclude_defaults=True),
        "item": item.id,
        "by": item.decided_by,
        "at": item.decided_at.isoformat() if item.decided_at else None,
        "reason": item.decision_reason,
        "reviewed_files": replaced.get("files", replaced.get("pairs_file")),
    }
    round_.data_manifest = edited
    session.commit()


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
    if round_.status == RoundStatus.SKIPPED:
        raise RuntimeError(f"round {round_id} was skipped: its artefact was rejected")
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
        "skipped_rounds": {
            r.track.value: r.id
            for r in cycle_rounds(session, cycle, skipped=True)
            if r.status == RoundStatus.SKIPPED
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


def pause_cycle(
    session: Session,
    cycle_id: int,
    *,
    step: str,
    reason: str,
    review_items: Sequence[int] = (),
) -> None:
    """Leave a cycle ``running`` with what stopped it at ``step``: a stack part that failed
    (a judge down, a launcher's process dead, a broken dataset file), or artefacts waiting
    for a reviewer (``review_items``). Nothing it finished is lost, and the next run resumes
    it at that step (a round that failed is launched again and resumes from its
    checkpoints). Commits."""
    session.rollback()
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.status != CycleStatus.RUNNING:
        return
    note: dict[str, Any] = {"step": step, "reason": reason, "at": datetime.now(UTC).isoformat()}
    if review_items:
        note["review_items"] = list(review_items)
    _note(cycle, paused=note)
    session.commit()


def run_state(cycle: Cycle) -> str:
    """The cycle's status, or for a running cycle that a run left stopped: :data:`PAUSED`
    (a part failed) or :data:`WAITING_FOR_REVIEW` (artefacts wait for a reviewer)."""
    note = _summary(cycle).get("paused")
    if cycle.status != CycleStatus.RUNNING or not isinstance(note, dict):
        return cycle.status.value
    return WAITING_FOR_REVIEW if note.get("review_items") else PAUSED


def resume_cycle(session: Session, cycle: Cycle) -> None:
    """Clear a paused (or waiting) cycle's pause note (it runs again); commits."""
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
