"""Running a request's database work: authenticate the caller, then do the work, in one
worker thread with one session (one connection, one transaction)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, TypeVar

import anyio.to_thread
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


def _in_session(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    scope: Scope,
    work: Callable[[Session, Principal], T],
) -> T:
    try:
        with request.app.state.sessions() as session:
            return work(session, _authorize(session, credentials, scope))
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    # The pooled connection was dead (a database restart, an idle timeout): SQLAlchemy
    # has invalidated the pool. Every API operation is idempotent, so run it once more
    # on a fresh connection; a second failure reaches the 503 handler.
    with request.app.state.sessions() as session:
        return work(session, _authorize(session, credentials, scope))


async def run_authorized(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    scope: Scope,
    work: Callable[[Session, Principal], T],
) -> T:
    """Authorize the caller for ``scope`` and run ``work(session, principal)``.

    Both happen in one worker thread, one of at most as many as the pool has
    connections, so a thread never waits for a connection. ``work`` must be idempotent:
    it is retried once when its connection turns out to be dead.
    """
    call = partial(_in_session, request, credentials, scope, work)
    return await anyio.to_thread.run_sync(call, limiter=request.app.state.db_limiter)
