"""``POST /v1/feedback`` and ``POST /v1/feedback/batch``: user feedback from product apps."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Response, status

from flywheel.api.deps import SessionDep, require_scope
from flywheel.auth.service import Principal
from flywheel.db.models import Scope
from flywheel.signals import service
from flywheel.signals.schemas import BatchResult, FeedbackBatchIn, FeedbackEvent, IngestResult

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])

Ingester = Annotated[Principal, Depends(require_scope(Scope.INGEST))]

_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "The event_id was used before with a different body."}
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "A replay: the stored result."}, **_CONFLICT},
)
def post_feedback(
    event: Annotated[FeedbackEvent, Body(discriminator="kind")],
    principal: Ingester,
    session: SessionDep,
    response: Response,
) -> IngestResult:
    """Store one feedback event. Answered after the commit; a replay returns the stored result."""
    outcome = service.ingest_feedback(session, app=principal.app, event=event)
    if not outcome.created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return outcome.result


@router.post("/batch", status_code=status.HTTP_207_MULTI_STATUS)
def post_feedback_batch(
    batch: FeedbackBatchIn, principal: Ingester, session: SessionDep
) -> BatchResult:
    """Store up to 1,000 events: valid ones land, invalid ones are reported per item."""
    return service.ingest_feedback_batch(session, app=principal.app, events=batch.events)
