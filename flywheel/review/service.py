"""The review queue's decisions.

Approving a ``triage_case`` item routes its case (``--track`` is required: the reviewer's
route, recorded as a human override that becomes a training example); rejecting one
dismisses the case (not a failure worth a round). Deciding a ``model_promotion`` item
finishes its cycle in the same transaction (:func:`flywheel.cycle.finish.finish_cycle`:
promote or keep the serving model, fixed cases, regression scenarios). Artefact items
(training data, reward recalibration) get their decision recorded; a rejected one blocks
the promotion of the candidate trained on it. Every change is audited; a decided item
cannot be decided again.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from flywheel.attribution.service import override_route
from flywheel.cycle.finish import CycleDecisionError, finish_cycle
from flywheel.db.models import (
    CaseStatus,
    FailureCase,
    Json,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    Track,
)
from flywheel.review import repository

OPEN_STATUSES = (ReviewStatus.PENDING, ReviewStatus.CLAIMED)


class ReviewError(ValueError):
    """A decision that cannot be taken (already decided, missing track or reason)."""


class ItemNotFoundError(LookupError):
    """No review item has that id."""


class ReviewItemOut(BaseModel):
    """A review item as reviewers see it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    kind: str
    status: str
    title: str
    created_at: datetime
    case_id: int | None
    cycle_id: int | None
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str | None
    edits: Json | None
    artefact: Json | None = None
    """Only when one item is shown."""


def _out(item: ReviewItem, *, artefact: bool = False) -> ReviewItemOut:
    return ReviewItemOut(
        id=item.id,
        kind=item.kind.value,
        status=item.status.value,
        title=item.title,
        created_at=item.created_at,
        case_id=item.case_id,
        cycle_id=item.cycle_id,
        decided_by=item.decided_by,
        decided_at=item.decided_at,
        decision_reason=item.decision_reason,
        edits=item.edits,
        artefact=item.artefact if artefact else None,
    )


def list_queue(
    session: Session, *, everything: bool = False, kind: ReviewKind | None = None, limit: int = 50
) -> list[ReviewItemOut]:
    """Waiting items (``everything``: decided ones too), oldest first."""
    statuses = tuple(ReviewStatus) if everything else OPEN_STATUSES
    items = repository.list_items(session, statuses=statuses, kind=kind, limit=limit)
    return [_out(i) for i in items]


def show_item(session: Session, *, item_id: int) -> tuple[ReviewItemOut, list[dict[str, object]]]:
    """One item with its artefact, and its audit trail."""
    item = repository.get_item(session, item_id=item_id)
    if item is None:
        raise ItemNotFoundError(f"no review item {item_id}")
    trail: list[dict[str, object]] = [
        {"actor": a.actor, "action": a.action, "at": a.at.isoformat(), "after": a.after}
        for a in repository.audit_trail(session, item_id=item_id)
    ]
    return _out(item, artefact=True), trail


def _open_item(session: Session, item_id: int, reviewer: str) -> ReviewItem:
    if not reviewer.strip():
        raise ReviewError("the reviewer must be named")
    item = repository.get_item(session, item_id=item_id, lock=True)
    if item is None:
        raise ItemNotFoundError(f"no review item {item_id}")
    if item.status not in OPEN_STATUSES:
        raise ReviewError(
            f"review item {item_id} was already {item.status.value} by {item.decided_by}"
        )
    return item


def _settle(
    session: Session, item: ReviewItem, status: ReviewStatus, reviewer: str, reason: str | None
) -> ReviewItemOut:
    """Record the decision on ``item`` (audited), commit, and return it as it now is."""
    repository.decide_item(
        session, item=item, status=status, actor=reviewer, reason=reason, at=datetime.now(UTC)
    )
    session.commit()
    session.refresh(item)
    return _out(item)


def _finish(session: Session, item: ReviewItem, *, approved: bool, reviewer: str) -> None:
    """A promotion decision finishes its cycle (before the decision commits)."""
    if item.kind != ReviewKind.MODEL_PROMOTION or item.cycle_id is None:
        return  # a promotion raised outside a cycle: the decision is only recorded
    try:
        finish_cycle(session, item=item, approved=approved, reviewer=reviewer)
    except CycleDecisionError as exc:
        session.rollback()
        raise ReviewError(str(exc)) from exc


def approve(
    session: Session,
    *,
    item_id: int,
    reviewer: str,
    reason: str | None = None,
    track: Track | None = None,
) -> ReviewItemOut:
    """Approve the item (a triage item: route its case to ``track``); commits."""
    item = _open_item(session, item_id, reviewer)
    if item.kind == ReviewKind.TRIAGE_CASE:
        if track is None or item.case_id is None:
            raise ReviewError("approving a triage item routes its case: name the track")
        # Routing the case settles its triage items, this one included.
        override_route(session, case_id=item.case_id, track=track, reviewer=reviewer, reason=reason)
        session.refresh(item)
        return _out(item)
    if track is not None:
        raise ReviewError(f"a {item.kind.value} item takes no track")
    _finish(session, item, approved=True, reviewer=reviewer)
    return _settle(session, item, ReviewStatus.APPROVED, reviewer, reason)


def reject(session: Session, *, item_id: int, reviewer: str, reason: str) -> ReviewItemOut:
    """Reject the item (a triage item: dismiss its case) with a reason; commits."""
    if not reason.strip():
        raise ReviewError("a rejection needs a reason")
    item = _open_item(session, item_id, reviewer)
    if item.kind == ReviewKind.TRIAGE_CASE and item.case_id is not None:
        case = session.get(FailureCase, item.case_id, with_for_update=True)
        if case is not None:
            case.status = CaseStatus.DISMISSED
    _finish(session, item, approved=False, reviewer=reviewer)
    return _settle(session, item, ReviewStatus.REJECTED, reviewer, reason)
