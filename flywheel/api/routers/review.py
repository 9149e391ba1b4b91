"""``/v1/review``: the human review queue (scope ``review``). The reviewer is the calling
key's app: give each reviewer a key of their own (``flywheel keys create --app alice
--scopes review``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from flywheel.api.deps import Credentials, run_authorized
from flywheel.api.errors import PROTECTED, WITH_BODY
from flywheel.auth.service import Principal
from flywheel.db.models import ReviewKind, Scope, Track
from flywheel.review import service
from flywheel.review.schemas import (
    MAX_ID,
    ApproveIn,
    AuditEntry,
    ClaimIn,
    ClusterDecisionIn,
    KindName,
    RejectIn,
    ReviewItemDetail,
    ReviewPage,
)
from flywheel.review.service import ClusterDecision, ReviewItemOut

router = APIRouter(prefix="/v1/review", tags=["review"], responses={**PROTECTED, **WITH_BODY})

T = TypeVar("T")
ItemId = Annotated[int, Path(ge=1, le=MAX_ID)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such item (or no open item of that kind in the cluster)."},
    409: {
        "description": "The item was decided already, another reviewer holds it, or the "
        "decision does not fit it (a triage approval without a track, edits on a promotion)."
    },
}


async def _review(
    request: Request, credentials: Credentials, work: Callable[[Session, str], T]
) -> T:
    """Run ``work(session, reviewer)`` for a caller with the review scope; the service's
    refusals become 404 / 409 with their message, edits the artefact does not take a 422
    naming the edit (``body.edits.<key>``) like any invalid body."""

    def guarded(session: Session, caller: Principal) -> T:
        try:
            return work(session, caller.app)
        except service.ItemNotFoundError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        except service.EditError as exc:
            where = (
                ("body", "edits", *exc.key.split(".")) if exc.key != "edits" else ("body", "edits")
            )
            raise RequestValidationError(
                [{"type": "value_error", "loc": where, "msg": str(exc)}]
            ) from exc
        except service.ReviewError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc

    return await run_authorized(request, credentials, Scope.REVIEW, guarded)


@router.get("/items")
async def list_items(
    credentials: Credentials,
    request: Request,
    state: Annotated[Literal["open", "all"], Query(description="open: waiting items")] = "open",
    kind: KindName | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="Last id of the page before.")] = 0,
) -> ReviewPage:
    """Items oldest first, a page at a time (``next_after`` leads to the next page)."""
    items = await _review(
        request,
        credentials,
        lambda session, _: service.list_queue(
            session,
            everything=state == "all",
            kind=ReviewKind(kind) if kind else None,
            limit=limit + 1,
            after_id=after,
        ),
    )
    page = items[:limit]
    return ReviewPage(items=page, next_after=page[-1].id if len(items) > limit else None)


@router.get("/items/{item_id}", responses={404: _ERRORS[404]})
async def get_item(item_id: ItemId, credentials: Credentials, request: Request) -> ReviewItemDetail:
    """One item with its artefact and its audit trail (who, when, what, before / after)."""

    def work(session: Session, _: str) -> ReviewItemDetail:
        item, trail = service.show_item(session, item_id=item_id)
        return ReviewItemDetail(item=item, audit=[AuditEntry.model_validate(t) for t in trail])

    return await _review(request, credentials, work)


@router.post(
    "/claim",
    response_model=ReviewItemOut,
    responses={204: {"description": "Nothing is waiting."}},
)
async def claim(body: ClaimIn, credentials: Credentials, request: Request) -> Any:
    """Claim the oldest waiting item (or one whose lease ran out) under a lease; concurrent
    reviewers never get the same item. 204 when nothing is waiting."""
    item = await _review(
        request,
        credentials,
        lambda session, reviewer: service.claim_next(
            session,
            reviewer=reviewer,
            kind=ReviewKind(body.kind) if body.kind else None,
            cluster_id=body.cluster_id,
            lease=timedelta(seconds=body.lease_seconds),
        ),
    )
    if item is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return item


@router.post("/items/{item_id}/release", responses=_ERRORS)
async def release(item_id: ItemId, credentials: Credentials, request: Request) -> ReviewItemOut:
    """Give a claimed item back to the queue (its holder only)."""
    return await _review(
        request,
        credentials,
        lambda session, reviewer: service.release(session, item_id=item_id, reviewer=reviewer),
    )


@router.post("/items/{item_id}/approve", responses=_ERRORS)
async def approve(
    item_id: ItemId, body: ApproveIn, credentials: Credentials, request: Request
) -> ReviewItemOut:
    """Approve (a triage item: route its case to ``track``; an artefact: as ``edits`` say,
    with a reason — 422 naming the edit when the artefact does not take it; a model
    promotion: promote the candidate and finish its cycle)."""
    return await _review(
        request,
        credentials,
        lambda session, reviewer: service.approve(
            session,
            item_id=item_id,
            reviewer=reviewer,
            reason=body.reason,
            track=Track(body.track) if body.track else None,
            edits=body.edits,
        ),
    )


@router.post("/items/{item_id}/reject", responses=_ERRORS)
async def reject(
    item_id: ItemId, body: RejectIn, credentials: Credentials, request: Request
) -> ReviewItemOut:
    """Reject with a reason (a triage item: dismiss its case; a model promotion: keep the
    serving model and finish its cycle)."""
    return await _review(
        request,
        credentials,
        lambda session, reviewer: service.reject(
            session, item_id=item_id, reviewer=reviewer, reason=body.reason
        ),
    )


@router.post("/clusters/{cluster_id}/decide", responses=_ERRORS)
async def decide_cluster(
    cluster_id: ItemId, body: ClusterDecisionIn, credentials: Credentials, request: Request
) -> ClusterDecision:
    """One decision for every open item of a kind in a failure cluster (items another
    reviewer holds are skipped and listed)."""
    return await _review(
        request,
        credentials,
        lambda session, reviewer: service.decide_cluster(
            session,
            cluster_id=cluster_id,
            kind=ReviewKind(body.kind),
            approved=body.decision == "approve",
            reviewer=reviewer,
            reason=body.reason,
            track=Track(body.track) if body.track else None,
        ),
    )
