"""``POST /v1/evaluations``: standardized evaluation results."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from flywheel.api.deps import Credentials, run_authorized
from flywheel.api.errors import PROTECTED, WITH_BODY
from flywheel.db.models import Scope
from flywheel.signals import service
from flywheel.signals.schemas import EvaluationRunIn, EvaluationRunResult

router = APIRouter(
    prefix="/v1/evaluations", tags=["evaluations"], responses={**PROTECTED, **WITH_BODY}
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "A replay: the stored run."},
        409: {"description": "The run_id was used before with a different body."},
    },
)
async def post_evaluation(
    run: EvaluationRunIn, credentials: Credentials, request: Request, response: Response
) -> EvaluationRunResult:
    """Store one evaluation run with its per-sample results (one signal per sample)."""
    outcome = await run_authorized(
        request,
        credentials,
        Scope.INGEST,
        lambda session, caller: service.ingest_evaluation(session, app=caller.app, run=run),
    )
    if not outcome.created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return outcome.result
