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


async def run_authorized(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    scope: Scope,
    work: Callable[[Session, Principal], T],
) -> T:
    """Authorize the caller for ``scope`` and run ``work(session, principal)``.

    ``work`` must be idempotent: it is run once more, on a fresh connection, when its
    pooled connection turns out to be dead (a database restart, an idle timeout), which
    is cheaper than testing every connection before use.
    """

    def authorized_work(session: Session) -> T:
        return work(session, _authorize(session, credentials, scope))

    try:
        async with request.app.state.sessions() as session:
            result: T = await session.run_sync(authorized_work)
            return result
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    # SQLAlchemy has invalidated the pool; a second failure reaches the 503 handler.
    async with request.app.state.sessions() as session:
        retried: T = await session.run_sync(authorized_work)
        return retried
