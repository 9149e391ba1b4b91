"""Request-scoped dependencies: a database session and the authenticated caller."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from flywheel.auth.service import Principal, authenticate
from flywheel.db.models import Scope

_bearer = HTTPBearer(auto_error=False, description="A flywheel API key: `Bearer fwk_...`")


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require_scope(scope: Scope) -> Callable[..., Principal]:
    """A dependency admitting keys that hold ``scope`` (or ``admin``).

    401 without a valid key, 403 with a key that lacks the scope.
    """

    def dependency(
        session: SessionDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if credentials is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing API key: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = authenticate(session, secret=credentials.credentials)
        session.rollback()
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

    return dependency
