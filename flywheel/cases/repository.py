"""Queries over ``failure_cases`` and ``case_signals``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from flywheel.db.models import (
    CaseSignal,
    CaseStatus,
    FailureCase,
    FailureCluster,
    Json,
    Signal,
    SignalSource,
    Task,
)


def failing_unlinked_signals(
    session: Session, *, condition: ColumnElement[bool], after_id: int, limit: int
) -> Sequence[Signal]:
    """Signals past ``after_id`` that meet ``condition`` and belong to no case, oldest first."""
    statement = (
        select(Signal)
        .outerjoin(CaseSignal, CaseSignal.signal_id == Signal.id)
        .where(CaseSignal.signal_id.is_(None), Signal.id > after_id, condition)
        .order_by(Signal.id)
        .limit(limit)
    )
    return session.scalars(statement).all()


def case_id_by_key(session: Session, *, dedup_key: str) -> int | None:
    """The case with this deduplication key."""
    found: int | None = session.scalar(
        select(FailureCase.id).where(FailureCase.dedup_key == dedup_key)
    )
    return found


def open_case_id_by_image(session: Session, *, image_sha256: str) -> int | None:
    """The oldest case not yet fixed or dismissed that shows this exact image."""
    found: int | None = session.scalar(
        select(FailureCase.id)
        .where(
            FailureCase.image_sha256 == image_sha256,
            FailureCase.status.not_in([CaseStatus.FIXED, CaseStatus.DISMISSED]),
        )
        .order_by(FailureCase.id)
        .limit(1)
    )
    return found


def first_open_case(session: Session, *, case_ids: Sequence[int]) -> int | None:
    """The first of ``case_ids`` (in their order) that is neither fixed nor dismissed."""
    if not case_ids:
        return None
    open_ids = set(
        session.scalars(
            select(FailureCase.id).where(
                FailureCase.id.in_(case_ids),
                FailureCase.status.not_in([CaseStatus.FIXED, CaseStatus.DISMISSED]),
            )
        )
    )
    return next((case_id for case_id in case_ids if case_id in open_ids), None)


def insert_case(
    session: Session,
    *,
    dedup_key: str,
    task: Task,
    prompt: str,
    image_uri: str | None,
    image_sha256: str | None,
    model_version_id: int | None,
    skill: str | None,
    seen_at: datetime,
) -> tuple[int, bool]:
    """Create the open case of ``dedup_key``, or find the one a concurrent writer made:
    ``(id, created)``."""
    created: int | None = session.scalar(
        insert(FailureCase)
        .values(
            dedup_key=dedup_key,
            status=CaseStatus.OPEN,
            task=task,
            prompt=prompt,
            image_uri=image_uri,
            image_sha256=image_sha256,
            model_version_id=model_version_id,
            skill=skill,
            signal_count=0,
            first_seen_at=seen_at,
            last_seen_at=seen_at,
        )
        .on_conflict_do_nothing(index_elements=[FailureCase.dedup_key])
        .returning(FailureCase.id)
    )
    if created is not None:
        return created, True
    existing = case_id_by_key(session, dedup_key=dedup_key)
    assert existing is not None  # ON CONFLICT waited for the other writer's commit
    return existing, False


def link_signal(session: Session, *, case_id: int, signal_id: int) -> bool:
    """Link a signal to a case (once: a signal belongs to one case); False if it was linked
    already."""
    linked = session.scalar(
        insert(CaseSignal)
        .values(case_id=case_id, signal_id=signal_id)
        .on_conflict_do_nothing(index_elements=[CaseSignal.signal_id])
        .returning(CaseSignal.signal_id)
    )
    return linked is not None


def count_signals(session: Session, *, case_id: int, seen: Sequence[datetime]) -> None:
    """Count newly linked signals into a case and widen its first / last seen times."""
    session.execute(
        update(FailureCase)
        .where(FailureCase.id == case_id)
        .values(
            signal_count=FailureCase.signal_count + len(seen),
            first_seen_at=func.least(FailureCase.first_seen_at, min(seen)),
            last_seen_at=func.greatest(FailureCase.last_seen_at, max(seen)),
        )
    )


def case_signal_ids(session: Session, *, case_id: int) -> list[int]:
    """The ids of the signals that made a case, oldest first."""
    return list(
        session.scalars(
            select(CaseSignal.signal_id)
            .where(CaseSignal.case_id == case_id)
            .order_by(CaseSignal.signal_id)
        )
    )


def unthemed_open_cases(session: Session) -> list[FailureCase]:
    """Cases in no cluster that are neither fixed nor dismissed, oldest first."""
    return list(
        session.scalars(
            select(FailureCase)
            .where(
                FailureCase.cluster_id.is_(None),
                FailureCase.status.not_in([CaseStatus.FIXED, CaseStatus.DISMISSED]),
            )
            .order_by(FailureCase.id)
        )
    )


def evaluation_details(session: Session, *, case_ids: Sequence[int]) -> dict[int, list[Json]]:
    """The ``details`` of each case's evaluation samples and miner hits (both may carry the
    evaluator's verdicts), oldest first."""
    rows = session.execute(
        select(CaseSignal.case_id, Signal.details)
        .join(Signal, Signal.id == CaseSignal.signal_id)
        .where(
            CaseSignal.case_id.in_(case_ids),
            Signal.source.in_([SignalSource.EVALUATION, SignalSource.MINING]),
            Signal.details.is_not(None),
        )
        .order_by(Signal.id)
    )
    out: dict[int, list[Json]] = {}
    for case_id, details in rows:
        if details is not None:
            out.setdefault(case_id, []).append(details)
    return out


def clusters_by_label(session: Session) -> dict[str, int]:
    """Every cluster's id by label (the first, where labels repeat)."""
    out: dict[str, int] = {}
    for cluster_id, label in session.execute(
        select(FailureCluster.id, FailureCluster.label).order_by(FailureCluster.id)
    ):
        out.setdefault(label, cluster_id)
    return out


def insert_cluster(session: Session, *, label: str) -> int:
    """A new cluster's id."""
    created = session.scalar(
        insert(FailureCluster).values(label=label).returning(FailureCluster.id)
    )
    assert created is not None
    return int(created)


def set_cluster(session: Session, *, case_ids: Sequence[int], cluster_id: int) -> None:
    """Put cases in a cluster."""
    session.execute(
        update(FailureCase).where(FailureCase.id.in_(case_ids)).values(cluster_id=cluster_id)
    )


def cluster_prompts(session: Session, *, label_prefix: str) -> dict[int, list[str]]:
    """The prompts of the open cases of each cluster whose label starts with the prefix."""
    rows = session.execute(
        select(FailureCase.cluster_id, FailureCase.prompt)
        .join(FailureCluster, FailureCluster.id == FailureCase.cluster_id)
        .where(
            FailureCluster.label.startswith(label_prefix, autoescape=True),
            FailureCase.status.not_in([CaseStatus.FIXED, CaseStatus.DISMISSED]),
        )
        .order_by(FailureCase.cluster_id, FailureCase.id)
    )
    out: dict[int, list[str]] = {}
    for cluster_id, prompt in rows:
        if cluster_id is not None:
            out.setdefault(cluster_id, []).append(prompt)
    return out


def open_case_prompts(session: Session) -> list[str]:
    """The prompts of every case neither fixed nor dismissed."""
    return list(
        session.scalars(
            select(FailureCase.prompt).where(
                FailureCase.status.not_in([CaseStatus.FIXED, CaseStatus.DISMISSED])
            )
        )
    )


def cluster_labels(session: Session, *, cluster_ids: Sequence[int]) -> dict[int, str]:
    """The labels of these clusters, by id."""
    if not cluster_ids:
        return {}
    rows = session.execute(
        select(FailureCluster.id, FailureCluster.label).where(FailureCluster.id.in_(cluster_ids))
    )
    return {row[0]: row[1] for row in rows}
