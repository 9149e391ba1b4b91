"""Queries of the human review queue: items, their decisions and the audit trail."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from flywheel.db.models import (
    FailureCase,
    Json,
    ReviewAudit,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
)

ARTEFACT_KINDS = (
    ReviewKind.AUGMENTATION_BATCH,
    ReviewKind.REWARD_RECALIBRATION,
    ReviewKind.PROMPT_ENHANCER_DATA,
)
"""Items of a track's artefact (training data, reward recalibration): decided before their
round trains."""


def add_item(
    session: Session,
    *,
    kind: ReviewKind,
    title: str,
    artefact: Json,
    actor: str,
    cycle_id: int | None = None,
    training_round_id: int | None = None,
    case_id: int | None = None,
    cluster_id: int | None = None,
) -> ReviewItem:
    """A pending item (flushed) and its ``created`` audit row."""
    item = ReviewItem(
        kind=kind,
        status=ReviewStatus.PENDING,
        title=title,
        artefact=artefact,
        cycle_id=cycle_id,
        training_round_id=training_round_id,
        case_id=case_id,
        cluster_id=cluster_id,
    )
    session.add(item)
    session.flush()
    session.add(
        ReviewAudit(
            review_item_id=item.id,
            actor=actor,
            action="created",
            after={"status": item.status.value},
        )
    )
    return item


def add_triage_item(
    session: Session, *, case: FailureCase, title: str, artefact: Json
) -> ReviewItem:
    return add_item(
        session,
        kind=ReviewKind.TRIAGE_CASE,
        title=title,
        artefact=artefact,
        actor="attribution",
        case_id=case.id,
        cluster_id=case.cluster_id,
    )


def cycle_items(
    session: Session, *, cycle_id: int, kinds: tuple[ReviewKind, ...], lock: bool = False
) -> list[ReviewItem]:
    """The cycle's items of ``kinds``, oldest first."""
    query = (
        select(ReviewItem)
        .where(ReviewItem.cycle_id == cycle_id, ReviewItem.kind.in_(kinds))
        .order_by(ReviewItem.id)
    )
    return list(session.scalars(query.with_for_update() if lock else query))


def pending_triage(session: Session, *, case_id: int) -> list[ReviewItem]:
    """The case's triage items still waiting for a decision (locked)."""
    query = (
        select(ReviewItem)
        .where(
            ReviewItem.case_id == case_id,
            ReviewItem.kind == ReviewKind.TRIAGE_CASE,
            ReviewItem.status.in_([ReviewStatus.PENDING, ReviewStatus.CLAIMED]),
        )
        .with_for_update()
    )
    return list(session.scalars(query))


def decide_item(
    session: Session,
    *,
    item: ReviewItem,
    status: ReviewStatus,
    actor: str,
    reason: str | None,
    at: datetime,
    edits: Json | None = None,
) -> None:
    before = {"status": item.status.value}
    item.status = status
    item.decided_by = actor
    item.decided_at = at
    item.decision_reason = reason
    item.edits = edits
    session.add(
        ReviewAudit(
            review_item_id=item.id,
            actor=actor,
            action=status.value,
            before=before,
            after={"status": status.value, "edits": edits},
        )
    )


def get_item(session: Session, *, item_id: int, lock: bool = False) -> ReviewItem | None:
    query = select(ReviewItem).where(ReviewItem.id == item_id)
    return session.scalar(query.with_for_update() if lock else query)


def list_items(
    session: Session,
    *,
    statuses: tuple[ReviewStatus, ...],
    kind: ReviewKind | None = None,
    limit: int = 50,
    after_id: int = 0,
    claimed_by: str | None = None,
) -> list[ReviewItem]:
    """Items in ``statuses`` (of ``kind``, claimed by ``claimed_by``) with ids above
    ``after_id``, oldest first."""
    query = select(ReviewItem).where(ReviewItem.status.in_(statuses), ReviewItem.id > after_id)
    if kind is not None:
        query = query.where(ReviewItem.kind == kind)
    if claimed_by is not None:
        query = query.where(ReviewItem.claimed_by == claimed_by)
    return list(session.scalars(query.order_by(ReviewItem.id).limit(limit)))


def audit_trail(session: Session, *, item_id: int) -> list[ReviewAudit]:
    query = select(ReviewAudit).where(ReviewAudit.review_item_id == item_id)
    return list(session.scalars(query.order_by(ReviewAudit.id)))


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Pending, or claimed under a lease that has run out."""
    return or_(
        ReviewItem.status == ReviewStatus.PENDING,
        and_(ReviewItem.status == ReviewStatus.CLAIMED, ReviewItem.lease_expires_at < now),
    )


def claim_next(
    session: Session,
    *,
    now: datetime,
    kind: ReviewKind | None = None,
    cluster_id: int | None = None,
) -> ReviewItem | None:
    """The oldest claimable item, locked; items another transaction holds are skipped
    (``FOR UPDATE SKIP LOCKED``), so concurrent claimers never get the same one."""
    query = select(ReviewItem).where(_claimable(now))
    if kind is not None:
        query = query.where(ReviewItem.kind == kind)
    if cluster_id is not None:
        query = query.where(ReviewItem.cluster_id == cluster_id)
    query = query.order_by(ReviewItem.id).limit(1).with_for_update(skip_locked=True)
    return session.scalar(query)


def cluster_item_ids(
    session: Session, *, cluster_id: int, kind: ReviewKind, statuses: tuple[ReviewStatus, ...]
) -> list[int]:
    """Ids of the cluster's items of ``kind`` in ``statuses``, oldest first."""
    query = (
        select(ReviewItem.id)
        .where(
            ReviewItem.cluster_id == cluster_id,
            ReviewItem.kind == kind,
            ReviewItem.status.in_(statuses),
        )
        .order_by(ReviewItem.id)
    )
    return list(session.scalars(query))


def count_items(
    session: Session, *, statuses: tuple[ReviewStatus, ...], kind: ReviewKind | None = None
) -> int:
    query = select(func.count()).select_from(ReviewItem).where(ReviewItem.status.in_(statuses))
    if kind is not None:
        query = query.where(ReviewItem.kind == kind)
    return int(session.scalar(query) or 0)


def add_audit(
    session: Session,
    *,
    item: ReviewItem,
    actor: str,
    action: str,
    before: Json | None,
    after: Json | None,
) -> None:
    session.add(
        ReviewAudit(review_item_id=item.id, actor=actor, action=action, before=before, after=after)
    )
