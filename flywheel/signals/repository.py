"""Queries over ``signals``, ``evaluation_runs`` and ``model_versions``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from flywheel.db.models import EvaluationRun, ModelVersion, Signal, SignalKind, SignalSource


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """What identifies an already stored signal for idempotent replays."""

    id: int
    app: str
    event_id: str
    source: SignalSource
    kind: SignalKind
    received_at: datetime
    payload_sha256: str


_STORED_COLUMNS = (
    Signal.id,
    Signal.app,
    Signal.event_id,
    Signal.source,
    Signal.kind,
    Signal.received_at,
    Signal.payload_sha256,
)


def _stored(row: Row[int, str, str, SignalSource, SignalKind, datetime, str]) -> StoredEvent:
    id_, app, event_id, source, kind, received_at, payload_sha256 = row
    return StoredEvent(
        id=id_,
        app=app,
        event_id=event_id,
        source=source,
        kind=kind,
        received_at=received_at,
        payload_sha256=payload_sha256,
    )


def model_version_id(session: Session, *, name: str) -> int:
    """The id of the named model version, created on first sight (safe under concurrency)."""
    found = session.scalar(select(ModelVersion.id).where(ModelVersion.name == name))
    if found is not None:
        return found
    created: int | None = session.scalar(
        insert(ModelVersion)
        .values(name=name)
        .on_conflict_do_nothing(index_elements=[ModelVersion.name])
        .returning(ModelVersion.id)
    )
    if created is not None:
        return created
    return session.scalars(select(ModelVersion.id).where(ModelVersion.name == name)).one()


def model_version_names(session: Session, *, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(ids))
    )
    return {row.id: row.name for row in rows}


def insert_signals(session: Session, *, rows: Sequence[dict[str, Any]]) -> list[StoredEvent]:
    """Insert signals, skipping any whose (app, event_id) is already stored.

    Returns the rows that were inserted. Under concurrent inserts of the same event the
    unique index makes one win; the others skip it.
    """
    if not rows:
        return []
    stmt = (
        insert(Signal)
        .values(list(rows))
        .on_conflict_do_nothing(index_elements=[Signal.app, Signal.event_id])
        .returning(*_STORED_COLUMNS)
    )
    return [_stored(row) for row in session.execute(stmt)]


def stored_events(session: Session, *, keys: Sequence[tuple[str, str]]) -> list[StoredEvent]:
    """The stored signals for the given (app, event_id) pairs."""
    if not keys:
        return []
    stmt = select(*_STORED_COLUMNS).where(tuple_(Signal.app, Signal.event_id).in_(keys))
    return [_stored(row) for row in session.execute(stmt)]


def insert_evaluation_run(session: Session, *, values: dict[str, Any]) -> EvaluationRun | None:
    """Insert the run; ``None`` if this app already stored a run with that ``run_id``."""
    stmt = (
        insert(EvaluationRun)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[EvaluationRun.app, EvaluationRun.run_id])
        .returning(EvaluationRun)
    )
    return session.scalars(stmt).one_or_none()


def get_evaluation_run(session: Session, *, app: str, run_id: str) -> EvaluationRun | None:
    stmt = select(EvaluationRun).where(EvaluationRun.app == app, EvaluationRun.run_id == run_id)
    return session.scalars(stmt).one_or_none()


def list_signals(
    session: Session,
    *,
    limit: int,
    before_id: int | None = None,
    app: str | None = None,
    source: SignalSource | None = None,
    kind: SignalKind | None = None,
    model_version_id: int | None = None,
    received_after: datetime | None = None,
    received_before: datetime | None = None,
) -> list[Signal]:
    """Signals newest first, filtered, starting below ``before_id`` (the keyset cursor)."""
    stmt = select(Signal).order_by(Signal.id.desc()).limit(limit)
    if before_id is not None:
        stmt = stmt.where(Signal.id < before_id)
    if app is not None:
        stmt = stmt.where(Signal.app == app)
    if source is not None:
        stmt = stmt.where(Signal.source == source)
    if kind is not None:
        stmt = stmt.where(Signal.kind == kind)
    if model_version_id is not None:
        stmt = stmt.where(Signal.model_version_id == model_version_id)
    if received_after is not None:
        stmt = stmt.where(Signal.received_at >= received_after)
    if received_before is not None:
        stmt = stmt.where(Signal.received_at < received_before)
    return list(session.scalars(stmt))


def find_model_version_id(session: Session, *, name: str) -> int | None:
    return session.scalar(select(ModelVersion.id).where(ModelVersion.name == name))
