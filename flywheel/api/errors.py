"""Error responses: 400 for malformed JSON, 422 naming the field, 503 when the database is
away; and how they appear in the OpenAPI spec."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from flywheel.signals.service import EventConflict, ForeignApp, InvalidCursor

_log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "2"


class ApiError(BaseModel):
    """An error: what is wrong, in one sentence."""

    detail: str


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ApiError, "description": description, **extra}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}

PROTECTED: dict[int | str, dict[str, Any]] = {
    401: _error("No API key, or an unknown or revoked one."),
    403: _error("The key lacks the scope this endpoint needs."),
    429: _error("The key's rate limit is used up.", headers=_RETRY_AFTER),
    503: _error("The database is unavailable.", headers=_RETRY_AFTER),
}
"""The answers every endpoint that takes an API key may give (add to its router)."""

WITH_BODY: dict[int | str, dict[str, Any]] = {
    400: _error("The body is not JSON."),
    413: _error("The body is larger than FLYWHEEL_MAX_REQUEST_BYTES."),
}
"""The answers of an endpoint that reads a JSON body, before the body is validated."""


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        where = next(e for e in errors if e.get("type") == "json_invalid")
        detail = where.get("ctx", {}).get("error", "invalid JSON")
        return JSONResponse(
            {"detail": f"malformed JSON body: {detail}"}, status_code=status.HTTP_400_BAD_REQUEST
        )
    message = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:20])
    cleaned = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]
    return JSONResponse(
        {"detail": jsonable_encoder(cleaned), "message": message},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)


async def _bad_cursor(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_400_BAD_REQUEST)


async def _forbidden(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_403_FORBIDDEN)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    _log.warning("database unavailable: %s", type(exc).__name__)
    return JSONResponse(
        {"detail": "database unavailable, retry later"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(EventConflict, _conflict)
    app.add_exception_handler(InvalidCursor, _bad_cursor)
    app.add_exception_handler(ForeignApp, _forbidden)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(InterfaceError, _database_unavailable)
    app.add_exception_handler(PoolTimeoutError, _database_unavailable)
