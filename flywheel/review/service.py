"""The review queue's decisions.

Approving a ``triage_case`` item routes its case (``--track`` is required: the reviewer's
route, recorded as a human override that becomes a training example); rejecting one
dismisses the case (not a failure worth a round). Deciding a ``model_promotion`` item
finishes its cycle in the same transaction (:func:`flywheel.cycle.finish.finish_cycle`:
promote or keep the serving model, fixed cases, regression scenarios). Artefact items
(training data, reward recalibration) are decided before their round trains (the cycle's
``artefact-review`` step waits for them): approved — as is, or with edits the artefact
declares it takes (:mod:`flywheel.review.edits`; others are refused with
:class:`~flywheel.review.errors.EditError` naming the key) — the round trains on it;
rejected, the round is skipped. A decision resumes the cycle's Prefect flow run when it is
paused waiting for it. Every change is audited; a decided item cannot be decided again.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from flywheel.db.models import (
    CaseStatus,
    FailureCase,
    Json,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    RoundStatus,
    Track,
    TrainingRound,
)
from flywheel.review import repository
from flywheel.review.edits import check_edits, vocabulary_of
from flywheel.review.errors import EditError as EditError
from flywheel.review.errors import ReviewError as ReviewError

OPEN_STATUSES = (ReviewStatus.PENDING, ReviewStatus.CLAIMED)
DEFAULT_LEASE = timedelta(minutes=15)
"""How long a claim holds an item before it returns to the queue."""


class ItemNotFoundError(LookupError):
    """No review item has that id."""


class ClaimConflictError(ReviewError):
    """Another reviewer holds the item under a live lease."""


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
    cluster_id: int | None
    claimed_by: str | None
    lease_expires_at: datetime | None
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
        cluster_id=item.cluster_id,
        claimed_by=item.claimed_by if item.status == ReviewStatus.CLAIMED else None,
        lease_expires_at=item.lease_expires_at if item.status == ReviewStatus.CLAIMED else None,
        decided_by=item.decided_by,
        decided_at=item.decided_at,
        decision_reason=item.decision_reason,
        edits=item.edits,
        artefact=item.artefact if artefact else None,
    )


def list_queue(
    session: Session,
    *,
    everything: bool = False,
    kind: ReviewKind | None = None,
    limit: int = 50,
    after_id: int = 0,
) -> list[ReviewItemOut]:
    """Waiting items (``everything``: decided ones too) with ids above ``after_id``, oldest
    first."""
    statuses = tuple(ReviewStatus) if everything else OPEN_STATUSES
    items = repository.list_items(
        session, statuses=statuses, kind=kind, limit=limit, after_id=after_id
    )
    return [_out(i) for i in items]


def claimed_by(session: Session, *, reviewer: str) -> list[ReviewItemOut]:
    """The items ``reviewer`` holds under a live lease, with their artefacts."""
    now = datetime.now(UTC)
    items = repository.list_items(
        session, statuses=(ReviewStatus.CLAIMED,), limit=100, claimed_by=reviewer
    )
    return [
        _out(i, artefact=True)
        for i in items
        if i.lease_expires_at is not None and i.lease_expires_at > now
    ]


def show_item(session: Session, *, item_id: int) -> tuple[ReviewItemOut, list[dict[str, object]]]:
    """One item with its artefact, and its audit trail."""
    item = repository.get_item(session, item_id=item_id)
    if item is None:
        raise ItemNotFoundError(f"no review item {item_id}")
    trail: list[dict[str, object]] = [
        {
            "actor": a.actor,
            "action": a.action,
            "at": a.at.isoformat(),
            "before": a.before,
            "after": a.after,
        }
        for a in repository.audit_trail(session, item_id=item_id)
    ]
    return _out(item, artefact=True), trail


def _reviewer(reviewer: str) -> str:
    if not reviewer.strip():
        raise ReviewError("the reviewer must be named")
    return reviewer


def _open_item(session: Session, item_id: int, reviewer: str) -> ReviewItem:
    """The item, locked, still open and not held by another reviewer's live lease."""
    _reviewer(reviewer)
    item = repository.get_item(session, item_id=item_id, lock=True)
    if item is None:
        raise ItemNotFoundError(f"no review item {item_id}")
    if item.status not in OPEN_STATUSES:
        raise ReviewError(
            f"review item {item_id} was already {item.status.value} by {item.decided_by}"
        )
    _check_lease(item, reviewer)
    return item


def _check_lease(item: ReviewItem, reviewer: str) -> None:
    live = (
        item.status == ReviewStatus.CLAIMED
        and item.lease_expires_at is not None
        and item.lease_expires_at > datetime.now(UTC)
    )
    if live and item.claimed_by != reviewer:
        assert item.lease_expires_at is not None
        until = item.lease_expires_at.isoformat(timespec="seconds")
        raise ClaimConflictError(
            f"review item {item.id} is claimed by {item.claimed_by} until {until}"
        )


def claim_next(
    session: Session,
    *,
    reviewer: str,
    kind: ReviewKind | None = None,
    cluster_id: int | None = None,
    lease: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> ReviewItemOut | None:
    """Claim the oldest waiting item (or one whose lease ran out) for ``lease``; None when
    the queue is empty. Concurrent claimers never get the same item. Commits."""
    _reviewer(reviewer)
    if lease <= timedelta(0):
        raise ReviewError("a lease must be positive")
    now = now or datetime.now(UTC)
    item = repository.claim_next(session, now=now, kind=kind, cluster_id=cluster_id)
    if item is None:
        session.rollback()
        return None
    before = {"status": item.status.value, "claimed_by": item.claimed_by}
    item.status = ReviewStatus.CLAIMED
    item.claimed_by = reviewer
    item.lease_expires_at = now + lease
    repository.add_audit(
        session,
        item=item,
        actor=reviewer,
        action="claimed",
        before=before,
        after={
            "status": item.status.value,
            "claimed_by": reviewer,
            "lease_expires_at": item.lease_expires_at.isoformat(),
        },
    )
    session.commit()
    session.refresh(item)
    return _out(item, artefact=True)


def release(session: Session, *, item_id: int, reviewer: str) -> ReviewItemOut:
    """Give a claimed item back to the queue (only its holder). Commits."""
    item = _open_item(session, item_id, reviewer)
    if item.status != ReviewStatus.CLAIMED or item.claimed_by != reviewer:
        raise ReviewError(f"review item {item_id} is not claimed by {reviewer}")
    item.status = ReviewStatus.PENDING
    item.lease_expires_at = None
    repository.add_audit(
        session,
        item=item,
        actor=reviewer,
        action="released",
        before={"status": "claimed", "claimed_by": reviewer},
        after={"status": "pending"},
    )
    session.commit()
    session.refresh(item)
    return _out(item)


def _settle(
    session: Session,
    item: ReviewItem,
    status: ReviewStatus,
    reviewer: str,
    reason: str | None,
    *,
    edits: Json | None = None,
) -> ReviewItemOut:
    """Record the decision on ``item`` (audited), commit, and return it as it now is."""
    repository.decide_item(
        session,
        item=item,
        status=status,
        actor=reviewer,
        reason=reason,
        at=datetime.now(UTC),
        edits=edits,
    )
    session.commit()
    session.refresh(item)
    return _out(item)


def _finish(session: Session, item: ReviewItem, *, approved: bool, reviewer: str) -> None:
    """A promotion decision finishes its cycle (before the decision commits)."""
    if item.kind != ReviewKind.MODEL_PROMOTION or item.cycle_id is None:
        return  # a promotion raised outside a cycle: the decision is only recorded
    from flywheel.cycle.finish import CycleDecisionError, finish_cycle

    try:
        finish_cycle(session, item=item, approved=approved, reviewer=reviewer)
    except CycleDecisionError as exc:
        session.rollback()
        raise ReviewError(str(exc)) from exc


def _resume_cycle_flow(session: Session, item: ReviewItem) -> None:
    """After a committed promotion or artefact decision: resume the cycle's Prefect flow run
    if it is paused waiting for it (``review_wait_seconds``); only with a configured Prefect
    API."""
    if (
        item.kind not in (ReviewKind.MODEL_PROMOTION, *repository.ARTEFACT_KINDS)
        or item.cycle_id is None
    ):
        return
    if not os.environ.get("PREFECT_API_URL"):
        return
    from flywheel.db.models import Cycle

    cycle = session.get(Cycle, item.cycle_id)
    if cycle is None or not cycle.flow_run_id:
        return
    from uuid import UUID

    from prefect import get_client

    run_id = UUID(cycle.flow_run_id)
    with get_client(sync_client=True) as client:  # sync: also right inside the API's loop
        state = client.read_flow_run(run_id).state
        if state is not None and state.is_paused():
            client.resume_flow_run(run_id)


def _checked_edits(session: Session, item: ReviewItem, edits: Json) -> Json:
    """``edits`` as the artefact's round will apply them; :class:`EditError` when the
    artefact does not take them (or its round trained already)."""
    checked = check_edits(edits, vocabulary_of(item.artefact), kind=item.kind.value)
    if item.training_round_id is not None:
        round_ = session.get(TrainingRound, item.training_round_id)
        if round_ is not None and round_.status != RoundStatus.PENDING:
            raise EditError(
                f"edits: round {round_.id} is {round_.status.value}: its data can no longer "
                "be edited",
                key="edits",
            )
    return checked.model_dump(mode="json", exclude_defaults=True)


def approve(
    session: Session,
    *,
    item_id: int,
    reviewer: str,
    reason: str | None = None,
    track: Track | None = None,
    edits: Json | None = None,
) -> ReviewItemOut:
    """Approve the item (a triage item: route its case to ``track``; an artefact: as edited
    by ``edits``, which need a reason and must be edits the artefact takes —
    :class:`EditError` otherwise); commits."""
    if edits is not None and not (reason or "").strip():
        raise ReviewError("an edit needs a reason")
    item = _open_item(session, item_id, reviewer)
    if edits is not None and item.kind in (ReviewKind.TRIAGE_CASE, ReviewKind.MODEL_PROMOTION):
        raise ReviewError(f"a {item.kind.value} item takes no edits")
    if edits is not None:
        try:
            edits = _checked_edits(session, item, edits)
        except EditError:
            session.rollback()
            raise
    if item.kind == ReviewKind.TRIAGE_CASE:
        if track is None or item.case_id is None:
            raise ReviewError("approving a triage item routes its case: name the track")
        from flywheel.attribution.service import override_route

        # Routing the case settles its triage items, this one included.
        override_route(session, case_id=item.case_id, track=track, reviewer=reviewer, reason=reason)
        session.refresh(item)
        return _out(item)
    if track is not None:
        raise ReviewError(f"a {item.kind.value} item takes no track")
    _finish(session, item, approved=True, reviewer=reviewer)
    out = _settle(session, item, ReviewStatus.APPROVED, reviewer, reason, edits=edits)
    _resume_cycle_flow(session, item)
    return out


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
    out = _settle(session, item, ReviewStatus.REJECTED, reviewer, reason)
    _resume_cycle_flow(session, item)
    return out


class ClusterDecision(BaseModel):
    """What a batch decision on a cluster did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decided: list[int]
    skipped: dict[int, str]
    """Item id -> why it was left alone (held by another reviewer, already decided)."""


def decide_cluster(
    session: Session,
    *,
    cluster_id: int,
    kind: ReviewKind,
    approved: bool,
    reviewer: str,
    reason: str | None = None,
    track: Track | None = None,
) -> ClusterDecision:
    """Approve or reject every open item of ``kind`` in the cluster, one decision (and one
    commit) per item, as :func:`approve` / :func:`reject` would."""
    _reviewer(reviewer)
    if kind == ReviewKind.MODEL_PROMOTION:
        raise ReviewError("a model promotion is decided on its own, not by cluster")
    if not approved and not (reason or "").strip():
        raise ReviewError("a rejection needs a reason")
    ids = repository.cluster_item_ids(
        session, cluster_id=cluster_id, kind=kind, statuses=OPEN_STATUSES
    )
    session.rollback()
    if not ids:
        raise ItemNotFoundError(f"no open {kind.value} item in cluster {cluster_id}")
    decided: list[int] = []
    skipped: dict[int, str] = {}
    for item_id in ids:
        try:
            if approved:
                approve(session, item_id=item_id, reviewer=reviewer, reason=reason, track=track)
            else:
                reject(session, item_id=item_id, reviewer=reviewer, reason=reason or "")
        except ReviewError as exc:
            session.rollback()
            skipped[item_id] = str(exc)
            continue
        decided.append(item_id)
    return ClusterDecision(decided=decided, skipped=skipped)
