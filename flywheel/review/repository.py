"""Queries of the human review queue: items, their decisions and the audit trail."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.db.models import (
    FailureCase,
    Json,
    ReviewAudit,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
)


def add_triage_item(
    session: Session, *, case: FailureCase, title: str, artefact: Json
) -> ReviewItem:
    item = ReviewItem(
        kind=ReviewKind.TRIAGE_CASE,
        status=ReviewStatus.PENDING,
        title=title,
        artefact=artefact,
        case_id=case.id,
        cluster_id=case.cluster_id,
    )
    session.add(item)
    session.flush()
    session.add(
        ReviewAudit(
            review_item_id=item.id,
            actor="attribution",
            action="created",
            after={"status": item.status.value},
        )
    )
    return item


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
) -> list[ReviewItem]:
    """Items in ``statuses`` (of ``kind``), oldest first."""
    query = select(ReviewItem).where(ReviewItem.status.in_(statuses))
    if kind is not None:
        query = query.where(ReviewItem.kind == kind)
    return list(session.scalars(query.order_by(ReviewItem.id).limit(limit)))


def audit_trail(session: Session, *, item_id: int) -> list[ReviewAudit]:
    query = select(ReviewAudit).where(ReviewAudit.review_item_id == item_id)
    return list(session.scalars(query.order_by(ReviewAudit.id)))
