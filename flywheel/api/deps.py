"""Running a request's database work: authenticate the caller, then do the work, with one
session (one connection, one transaction).

Services and repositories are synchronous SQLAlchemy code, shared with the CLI and the
workers. The API runs them on the event loop through ``AsyncSession.run_sync``: their
database I/O is awaited by psycopg's async mode (greenlets), so no thread pool and no
GIL hand-offs stand between a request and its answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from flywheel.auth.service import Principal, authenticate
from flywheel.db.models import Scope

T = TypeVar("T")

_bearer = HTTPBearer(auto_error=False, description="A flywheel API key: `Bearer fwk_...`")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _authorize(
    session: Session, credentials: HTTPAuthorizationCredentials | None, scope: Scope
) -> Principal:
    """The caller: 401 without a valid key, 403 with a key that lacks ``scope`` (or admin)."""
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = authenticate(session, secret=credentials.credentials)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not principal.allows(scope):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this API key lacks the {scope.value!r} scope"
        )
    return principal


async def _enforce_rate_limit(request: Request, principal: Principal) -> None:
    """429 with Retry-After when the caller's key has used up its limit."""
    exceeded = await request.app.state.rate_limiter.hit(
        key_prefix=principal.key_prefix, key_limit=principal.rate_limit
    )
    if exceeded is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit of this API key exceeded ({exceeded.limit}); "
            f"retry after {exceeded.retry_after} s",
            headers={"Retry-After": str(exceeded.retry_after)},
        )


async def run_authorized(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    scope: Scope,
    work: Callable[[Session, Principal], T],
) -> T:
    """Authorize the caller for ``scope``, count the request against its key's rate limit,
    and run ``work(session, principal)``.

    ``work`` must be idempotent: it is run once more, on a fresh connection, when its
    pooled connection turns out to be dead (a database restart, an idle timeout) between
    the engine's pre-ping and the work. The retry is not counted against the limit again.
    """
    counted = False

    async def attempt() -> T:
        nonlocal counted
        async with request.app.state.sessions() as session:
            principal = await session.run_sync(_authorize, credentials, scope)
            if not counted:
                counted = True
                await _enforce_rate_limit(request, principal)
            result: T = await session.run_sync(work, principal)
            return result

    try:
        return await attempt()
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    # SQLAlchemy has invalidated the pool; a second failure reaches the 503 handler.
    return await attempt()
