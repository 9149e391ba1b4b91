"""``GET /v1/signals``: read the signal store, newest first, with cursor pagination."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from flywheel.api.deps import Credentials, run_authorized
from flywheel.api.errors import PROTECTED, ApiError
from flywheel.db.models import Scope
from flywheel.signals import service
from flywheel.signals.schemas import SignalPage, SignalQuery

router = APIRouter(prefix="/v1/signals", tags=["signals"], responses=PROTECTED)


@router.get(
    "", responses={400: {"model": ApiError, "description": "A cursor this API did not hand out."}}
)
async def get_signals(
    query: Annotated[SignalQuery, Query()], credentials: Credentials, request: Request
) -> SignalPage:
    """Signals matching the filters, newest first."""
    return await run_authorized(
        request,
        credentials,
        Scope.READ,
        lambda session, caller: service.list_signals(session, principal=caller, query=query),
    )
