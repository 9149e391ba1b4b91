"""Queries over ``signals``, ``evaluation_runs`` and ``model_versions``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Insert,
    Row,
    SmallInteger,
    Table,
    Text,
    bindparam,
    column,
    func,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from flywheel.db.models import (
    EvaluationRun,
    Json,
    ModelVersion,
    Signal,
    SignalKind,
    SignalSource,
    Task,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class NewSignal:
    """A signal to insert; ``payload_json`` is canonical JSON, ``payload_sha256`` its hash."""

    source: SignalSource
    kind: SignalKind
    app: str
    event_id: str
    task: Task
    prompt: str
    payload_json: str
    payload_sha256: str
    image_uri: str | None = None
    image_sha256: str | None = None
    input_images: list[Json] | None = None
    model_version_id: int | None = None
    evaluation_run_id: int | None = None
    thumbs_up: bool | None = None
    rating: int | None = None
    passed: bool | None = None
    flags: list[str] | None = None
    comment: str | None = None
    chosen_image_uri: str | None = None
    rejected_image_uri: str | None = None
    scores: dict[str, float] | None = None
    details: Json | None = None
    user_ref: str | None = None
    session_ref: str | None = None
    occurred_at: datetime | None = None


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
    """The id of the named model version, created on first sight (safe under concurrency).

    Ids of committed versions are remembered on the pooled connection, so a known name
    costs no query. An id this transaction created is not remembered until a later call
    finds it committed.
    """
    known: dict[str, int] = session.connection().info.setdefault("model_version_ids", {})
    if name in known:
        return known[name]
    found = find_model_version_id(session, name=name)
    if found is not None:
        known[name] = found
        return found
    created: int | None = session.scalar(
        insert(ModelVersion)
        .values(name=name)
        .on_conflict_do_nothing(index_elements=[ModelVersion.name])
        .returning(ModelVersion.id)
    )
    if created is not None:
        return created
    # Another transaction inserted it first; ON CONFLICT waited for its commit.
    concurrent = find_model_version_id(session, name=name)
    assert concurrent is not None
    return concurrent


def model_version_names(session: Session, *, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(ids))
    )
    return {row.id: row.name for row in rows}


_FIELD_NAMES = tuple(f.name for f in fields(NewSignal))

# The column type of each NewSignal field inside the JSON record set; the rest are text.
_RECORD_TYPES: dict[str, TypeEngine[Any]] = {
    "model_version_id": BigInteger(),
    "evaluation_run_id": BigInteger(),
    "thumbs_up": Boolean(),
    "passed": Boolean(),
    "rating": SmallInteger(),
    "occurred_at": DateTime(timezone=True),
    "flags": ARRAY(Text()),
    "input_images": JSONB(),
    "scores": JSONB(),
    "details": JSONB(),
}


@cache
def _insert_signals_statement() -> Insert:
    """INSERT ... SELECT ... FROM jsonb_to_recordset(:rows) ... ON CONFLICT DO NOTHING.

    All rows travel as one JSON document: one parameter and one statement (compiled
    once) for any number of rows, parsed by PostgreSQL in C.
    """
    names = _FIELD_NAMES
    records = (
        func.jsonb_to_recordset(bindparam("rows", type_=Text()).cast(JSONB()))
        .table_valued(*(column(n, _RECORD_TYPES.get(n, Text())) for n in names))
        .render_derived(name="record", with_types=True)
    )
    selected = [
        records.c.payload_json.cast(JSONB()) if n == "payload_json" else records.c[n] for n in names
    ]
    # The Core table, not the mapped class: a plain INSERT ... SELECT, not an ORM bulk insert.
    table = Signal.__table__
    assert isinstance(table, Table)
    return (
        insert(table)
        .from_select(["payload" if n == "payload_json" else n for n in names], select(*selected))
        .on_conflict_do_nothing(index_elements=[table.c.app, table.c.event_id])
        .returning(*(table.c[c.key] for c in _STORED_COLUMNS))
    )


def _record(signal: NewSignal) -> dict[str, Any]:
    record = {name: getattr(signal, name) for name in _FIELD_NAMES}
    record["source"] = signal.source.value
    record["kind"] = signal.kind.value
    record["task"] = signal.task.value
    if signal.occurred_at is not None:
        record["occurred_at"] = signal.occurred_at.isoformat()
    return record


def insert_signals(session: Session, *, signals: Sequence[NewSignal]) -> list[StoredEvent]:
    """Insert signals, skipping any whose (app, event_id) is already stored.

    Returns the rows that were inserted. Under concurrent inserts of the same event the
    unique index makes one win; the others skip it. Within one call, the first of
    several signals with the same (app, event_id) wins.
    """
    if not signals:
        return []
    rows = json.dumps([_record(s) for s in signals], separators=(",", ":"), ensure_ascii=False)
    return [_stored(row) for row in session.execute(_insert_signals_statement(), {"rows": rows})]


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
