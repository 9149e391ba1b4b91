"""Ingesting and reading signals.

Each write commits before it returns, so a caller that acknowledges after the call
acknowledges only what is durable. Idempotency rests on the unique (app, event_id)
index: a replay with the same canonical body gets the stored result back, a replay with
a different body is a conflict.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from sqlalchemy.orm import Session

from flywheel.auth.service import Principal
from flywheel.db.models import Scope, Signal, SignalKind, SignalSource
from flywheel.signals import repository
from flywheel.signals.repository import NewSignal, StoredEvent
from flywheel.signals.schemas import (
    FEEDBACK_EVENT,
    BatchItemResult,
    BatchResult,
    CommentFeedback,
    EvaluationRunIn,
    EvaluationRunResult,
    FeedbackEvent,
    FlagsFeedback,
    ImageRef,
    IngestResult,
    PairwiseFeedback,
    RatingFeedback,
    SignalOut,
    SignalPage,
    SignalQuery,
    ThumbsFeedback,
)


class EventConflict(Exception):
    """The event id was already used for a different body."""

    def __init__(self, app: str, event_id: str) -> None:
        super().__init__(
            f"event_id {event_id!r} of app {app!r} was already stored with a different body"
        )


class ForeignApp(Exception):
    """A key asked for another app's signals without the admin scope."""


class InvalidCursor(ValueError):
    """A pagination cursor this service did not hand out."""


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ingested(Generic[T]):
    """A write's result and whether this call created it (``False``: an idempotent replay)."""

    result: T
    created: bool


SERVED_PROMPT = "served_prompt"
"""The key of a signal's ``details`` holding what the model was given where the app rewrote
the signal's prompt (feedback's ``served_prompt``; a scan hit keeps its generation's)."""


def served_prompt(signal: Signal) -> str | None:
    """The prompt the model was given where the app rewrote ``signal``'s (None: it was given
    ``signal.prompt``)."""
    served = signal.details.get(SERVED_PROMPT) if isinstance(signal.details, dict) else None
    return served if isinstance(served, str) else None


def canonical_json(document: dict[str, Any]) -> tuple[str, str]:
    """The document as canonical JSON (sorted keys, no whitespace) and that text's SHA-256.

    Two bodies that differ only in key order or whitespace get the same hash.
    """
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text, hashlib.sha256(text.encode()).hexdigest()


def _feedback_signal(app: str, event: FeedbackEvent, model_version_id: int) -> NewSignal:
    # Feedback events hold only typed fields (no free-form mappings), so pydantic's JSON of
    # the validated event is already canonical: field order is the schema's, not the client's.
    payload_json = event.model_dump_json()
    digest = hashlib.sha256(payload_json.encode()).hexdigest()
    specific: dict[str, Any] = {}
    match event:
        case ThumbsFeedback():
            specific["thumbs_up"] = event.value == "up"
        case RatingFeedback():
            specific["rating"] = event.value
        case PairwiseFeedback():
            specific["chosen_image_uri"] = event.chosen.uri
            specific["rejected_image_uri"] = event.rejected.uri
            specific["details"] = {
                "chosen": event.chosen.model_dump(),
                "rejected": event.rejected.model_dump(),
            }
        case CommentFeedback():
            specific["comment"] = event.text
        case FlagsFeedback():
            specific["flags"] = list(event.flags)
            specific["comment"] = event.note
    if event.served_prompt is not None:
        specific["details"] = specific.get("details", {}) | {SERVED_PROMPT: event.served_prompt}
    return NewSignal(
        source=SignalSource.FEEDBACK,
        kind=SignalKind(event.kind),
        app=app,
        event_id=event.event_id,
        task=event.task,
        prompt=event.prompt,
        image_uri=event.image.uri if event.image else None,
        image_sha256=event.image.sha256 if event.image else None,
        input_images=[i.model_dump() for i in event.input_images] or None,
        model_version_id=model_version_id,
        user_ref=event.user_id,
        session_ref=event.session_id,
        occurred_at=event.timestamp,
        payload_json=payload_json,
        payload_sha256=digest,
        **specific,
    )


def _result(stored: StoredEvent) -> IngestResult:
    return IngestResult(
        id=stored.id,
        app=stored.app,
        event_id=stored.event_id,
        source=stored.source,
        kind=stored.kind,
        received_at=stored.received_at,
    )


def ingest_feedback(session: Session, *, app: str, event: FeedbackEvent) -> Ingested[IngestResult]:
    """Store one feedback event (or find its earlier copy). Raises :class:`EventConflict`."""
    version_id = repository.model_version_id(session, name=event.model_version)
    signal = _feedback_signal(app, event, version_id)
    inserted = repository.insert_signals(session, signals=[signal])
    if inserted:
        session.commit()
        return Ingested(result=_result(inserted[0]), created=True)
    (existing,) = repository.stored_events(session, keys=[(app, event.event_id)])
    session.rollback()
    if existing.payload_sha256 != signal.payload_sha256:
        raise EventConflict(app, event.event_id)
    return Ingested(result=_result(existing), created=False)


def _error_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        loc = ".".join(str(p) for p in item["loc"])
        parts.append(f"{loc}: {item['msg']}" if loc else item["msg"])
    return "; ".join(parts)


def ingest_feedback_batch(session: Session, *, app: str, events: list[Any]) -> BatchResult:
    """Store the valid events of a batch in one transaction; report every item."""
    results: list[BatchItemResult | None] = [None] * len(events)
    accepted: list[tuple[int, NewSignal]] = []
    version_ids: dict[str, int] = {}
    for index, raw in enumerate(events):
        try:
            event = FEEDBACK_EVENT.validate_python(raw)
        except ValidationError as error:
            event_id = raw.get("event_id") if isinstance(raw, dict) else None
            results[index] = BatchItemResult(
                index=index,
                event_id=event_id if isinstance(event_id, str) else None,
                status="invalid",
                status_code=422,
                error=_error_message(error),
            )
            continue
        if event.model_version not in version_ids:
            version_ids[event.model_version] = repository.model_version_id(
                session, name=event.model_version
            )
        signal = _feedback_signal(app, event, version_ids[event.model_version])
        accepted.append((index, signal))

    signals = [signal for _, signal in accepted]
    inserted = {s.event_id: s for s in repository.insert_signals(session, signals=signals)}
    missing = [(app, s.event_id) for s in signals if s.event_id not in inserted]
    existing = {s.event_id: s for s in repository.stored_events(session, keys=missing)}
    session.commit()

    claimed: set[str] = set()
    for index, signal in accepted:
        event_id = signal.event_id
        stored = inserted.get(event_id)
        if stored is not None and event_id not in claimed:
            claimed.add(event_id)
            status, code = "created", 201
        else:
            stored = inserted.get(event_id) or existing[event_id]
            if stored.payload_sha256 == signal.payload_sha256:
                status, code = "duplicate", 200
            else:
                results[index] = BatchItemResult(
                    index=index,
                    event_id=event_id,
                    status="conflict",
                    status_code=409,
                    error=str(EventConflict(app, event_id)),
                )
                continue
        results[index] = BatchItemResult(
            index=index,
            event_id=event_id,
            status=status,
            status_code=code,
            id=stored.id,
            received_at=stored.received_at,
        )

    final = [r for r in results if r is not None]
    return BatchResult(
        results=final,
        created=sum(r.status == "created" for r in final),
        duplicates=sum(r.status == "duplicate" for r in final),
        conflicts=sum(r.status == "conflict" for r in final),
        invalid=sum(r.status == "invalid" for r in final),
    )


def _sample_event_id(run_id: str, sample_id: str) -> str:
    return f"eval:{run_id}:{sample_id}"


def ingest_evaluation(
    session: Session, *, app: str, run: EvaluationRunIn
) -> Ingested[EvaluationRunResult]:
    """Store an evaluation run and one signal per sample, atomically.

    Raises :class:`EventConflict` when the run id (or a sample's event id) was used before
    with a different body.
    """
    payload = run.model_dump(mode="json")
    _, digest = canonical_json(payload)
    version_id = repository.model_version_id(session, name=run.model_version)
    stored_run = repository.insert_evaluation_run(
        session,
        values={
            "app": app,
            "run_id": run.run_id,
            "benchmark": run.benchmark,
            "suite": run.suite,
            "model_version_id": version_id,
            "sample_count": len(run.samples),
            "passed_count": sum(s.passed for s in run.samples),
            "payload_sha256": digest,
            "occurred_at": run.timestamp,
        },
    )
    created = stored_run is not None
    if stored_run is None:
        stored_run = repository.get_evaluation_run(session, app=app, run_id=run.run_id)
        session.rollback()
        if stored_run is None or stored_run.payload_sha256 != digest:
            raise EventConflict(app, run.run_id)
    else:
        signals = []
        for sample, sample_payload in zip(run.samples, payload["samples"], strict=True):
            sample_json, sample_digest = canonical_json(sample_payload)
            signals.append(
                NewSignal(
                    source=SignalSource.EVALUATION,
                    kind=SignalKind.EVALUATION_SAMPLE,
                    app=app,
                    event_id=_sample_event_id(run.run_id, sample.sample_id),
                    task=sample.task,
                    prompt=sample.prompt,
                    image_uri=sample.image.uri,
                    image_sha256=sample.image.sha256,
                    input_images=sample_payload["input_images"] or None,
                    model_version_id=version_id,
                    evaluation_run_id=stored_run.id,
                    passed=sample.passed,
                    scores=sample.scores,
                    details={
                        "benchmark": run.benchmark,
                        "suite": run.suite,
                        "skill": sample.skill,
                        "spec": sample.spec,
                    },
                    occurred_at=run.timestamp,
                    payload_json=sample_json,
                    payload_sha256=sample_digest,
                )
            )
        inserted = repository.insert_signals(session, signals=signals)
        if len(inserted) != len(signals):
            session.rollback()
            taken = {s.event_id for s in signals} - {s.event_id for s in inserted}
            raise EventConflict(app, sorted(taken)[0])
        session.commit()
    return Ingested(
        result=EvaluationRunResult(
            id=stored_run.id,
            app=stored_run.app,
            run_id=stored_run.run_id,
            benchmark=stored_run.benchmark,
            suite=stored_run.suite,
            model_version=run.model_version,
            samples=stored_run.sample_count,
            passed=stored_run.passed_count,
            received_at=stored_run.received_at,
        ),
        created=created,
    )


def encode_cursor(signal_id: int) -> str:
    return base64.urlsafe_b64encode(f"s{signal_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("cursor: not a cursor this API handed out") from None
    if not text.startswith("s") or not text[1:].isdigit():
        raise InvalidCursor("cursor: not a cursor this API handed out")
    return int(text[1:])


def _image(uri: str | None, sha256: str | None) -> ImageRef | None:
    return None if uri is None else ImageRef.model_construct(uri=uri, sha256=sha256)


def _signal_out(signal: Signal, version_names: dict[int, str]) -> SignalOut:
    return SignalOut(
        id=signal.id,
        source=signal.source,
        kind=signal.kind,
        app=signal.app,
        event_id=signal.event_id,
        task=signal.task,
        prompt=signal.prompt,
        image=_image(signal.image_uri, signal.image_sha256),
        input_images=[ImageRef.model_construct(**i) for i in signal.input_images or []],
        model_version=version_names.get(signal.model_version_id)
        if signal.model_version_id is not None
        else None,
        evaluation_run_id=signal.evaluation_run_id,
        thumbs_up=signal.thumbs_up,
        rating=signal.rating,
        passed=signal.passed,
        flags=signal.flags,
        comment=signal.comment,
        chosen_image_uri=signal.chosen_image_uri,
        rejected_image_uri=signal.rejected_image_uri,
        scores=signal.scores,
        details=signal.details,
        user_id=signal.user_ref,
        session_id=signal.session_ref,
        timestamp=signal.occurred_at,
        received_at=signal.received_at,
    )


def list_signals(session: Session, *, principal: Principal, query: SignalQuery) -> SignalPage:
    """A page of signals. Keys without the admin scope see only their own app's signals."""
    app = query.app
    if not principal.allows(Scope.ADMIN):
        if app is not None and app != principal.app:
            raise ForeignApp(f"app: this key may read only app {principal.app!r}")
        app = principal.app
    before_id = decode_cursor(query.cursor) if query.cursor is not None else None
    version_id: int | None = None
    if query.model_version is not None:
        version_id = repository.find_model_version_id(session, name=query.model_version)
        if version_id is None:
            return SignalPage(items=[], next_cursor=None)
    signals = repository.list_signals(
        session,
        limit=query.limit + 1,
        before_id=before_id,
        app=app,
        source=query.source,
        kind=query.kind,
        model_version_id=version_id,
        received_after=query.since,
        received_before=query.until,
    )
    page, more = signals[: query.limit], len(signals) > query.limit
    names = repository.model_version_names(
        session, ids={s.model_version_id for s in page if s.model_version_id is not None}
    )
    session.rollback()
    return SignalPage(
        items=[_signal_out(s, names) for s in page],
        next_cursor=encode_cursor(page[-1].id) if more else None,
    )
