"""``POST /v1/feedback`` and ``POST /v1/feedback/batch``: user feedback from product apps."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response, status

from flywheel.api.deps import Credentials, run_authorized
from flywheel.api.errors import PROTECTED, WITH_BODY
from flywheel.db.models import Scope
from flywheel.signals import service
from flywheel.signals.schemas import BatchResult, FeedbackBatchIn, FeedbackEvent, IngestResult

router = APIRouter(prefix="/v1/feedback", tags=["feedback"], responses={**PROTECTED, **WITH_BODY})

_REPLAY_OR_CONFLICT: dict[int | str, dict[str, Any]] = {
    200: {"description": "A replay: the stored result."},
    409: {"description": "The event_id was used before with a different body."},
}


@router.post("", status_code=status.HTTP_201_CREATED, responses=_REPLAY_OR_CONFLICT)
async def post_feedback(
    event: Annotated[FeedbackEvent, Body(discriminator="kind")],
    credentials: Credentials,
    request: Request,
    response: Response,
) -> IngestResult:
    """Store one feedback event. Answered after the commit; a replay returns the stored result."""
    outcome = await run_authorized(
        request,
        credentials,
        Scope.INGEST,
        lambda session, caller: service.ingest_feedback(session, app=caller.app, event=event),
    )
    if not outcome.created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return outcome.result


@router.post("/batch", status_code=status.HTTP_207_MULTI_STATUS)
async def post_feedback_batch(
    batch: FeedbackBatchIn, credentials: Credentials, request: Request
) -> BatchResult:
    """Store up to 1,000 events: valid ones land, invalid ones are reported per item."""
    return await run_authorized(
        request,
        credentials,
        Scope.INGEST,
        lambda session, caller: service.ingest_feedback_batch(
            session, app=caller.app, events=batch.events
        ),
    )
