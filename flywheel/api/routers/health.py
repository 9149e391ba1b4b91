"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from flywheel.api.errors import RETRY_AFTER_SECONDS

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, response: Response) -> dict[str, str]:
    """The database answers; 503 otherwise."""
    try:
        async with request.app.state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = RETRY_AFTER_SECONDS
        return {"status": "unavailable", "database": type(exc).__name__}
    return {"status": "ok", "database": "ok"}
