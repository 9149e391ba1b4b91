"""``GET /v1/signals``: read the signal store, newest first, with cursor pagination."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime

from flywheel.api.deps import Credentials, run_authorized
from flywheel.db.models import Scope, SignalKind, SignalSource
from flywheel.signals import service
from flywheel.signals.schemas import SignalPage

router = APIRouter(prefix="/v1/signals", tags=["signals"])

_PRINTABLE = r"^[\x21-\x7e]+$"


@router.get("")
async def get_signals(
    credentials: Credentials,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    source: SignalSource | None = None,
    kind: SignalKind | None = None,
    model_version: Annotated[str | None, Query(max_length=200, pattern=_PRINTABLE)] = None,
    app: Annotated[
        str | None,
        Query(
            max_length=100,
            pattern=_PRINTABLE,
            description="Admin keys only; other keys see their own app.",
        ),
    ] = None,
    since: Annotated[AwareDatetime | None, Query(description="received_at >= since")] = None,
    until: Annotated[AwareDatetime | None, Query(description="received_at < until")] = None,
) -> SignalPage:
    """Signals matching the filters, newest first."""
    return await run_authorized(
        request,
        credentials,
        Scope.READ,
        lambda session, caller: service.list_signals(
            session,
            principal=caller,
            limit=limit,
            cursor=cursor,
            app=app,
            source=source,
            kind=kind,
            model_version=model_version,
            since=since,
            until=until,
        ),
    )
