"""``POST /v1/evaluations``: standardized evaluation results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from flywheel.api.deps import SessionDep, require_scope
from flywheel.auth.service import Principal
from flywheel.db.models import Scope
from flywheel.signals import service
from flywheel.signals.schemas import EvaluationRunIn, EvaluationRunResult

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "A replay: the stored run."},
        409: {"description": "The run_id was used before with a different body."},
    },
)
def post_evaluation(
    run: EvaluationRunIn,
    principal: Annotated[Principal, Depends(require_scope(Scope.INGEST))],
    session: SessionDep,
    response: Response,
) -> EvaluationRunResult:
    """Store one evaluation run with its per-sample results (one signal per sample)."""
    outcome = service.ingest_evaluation(session, app=principal.app, run=run)
    if not outcome.created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return outcome.result
