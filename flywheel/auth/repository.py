"""Queries over ``api_keys``."""

from __future__ import annotations

from sqlalchemy import Row, func, select, update
from sqlalchemy.orm import Session

from flywheel.db.models import ApiKey


def insert_api_key(
    session: Session,
    *,
    app: str,
    prefix: str,
    secret_hash: str,
    scopes: list[str],
    rate_limit: str | None = None,
) -> ApiKey:
    key = ApiKey(
        app=app, prefix=prefix, secret_hash=secret_hash, scopes=scopes, rate_limit=rate_limit
    )
    session.add(key)
    session.flush()
    return key


def get_active_key_by_hash(
    session: Session, *, secret_hash: str
) -> Row[str, str, list[str], str | None] | None:
    """(app, prefix, scopes, rate_limit) of the unrevoked key with that hash; a plain row,
    no ORM object, since every request asks."""
    stmt = select(ApiKey.app, ApiKey.prefix, ApiKey.scopes, ApiKey.rate_limit).where(
        ApiKey.secret_hash == secret_hash, ApiKey.revoked_at.is_(None)
    )
    return session.execute(stmt).one_or_none()


def list_api_keys(session: Session, *, include_revoked: bool) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt))


def revoke_api_key(session: Session, *, prefix: str) -> ApiKey | None:
    """Mark the key revoked; ``None`` if no key has that prefix.

    Revoking twice keeps the first revocation time.
    """
    stmt = (
        update(ApiKey)
        .where(ApiKey.prefix == prefix)
        .values(revoked_at=func.coalesce(ApiKey.revoked_at, func.now()))
        .returning(ApiKey)
    )
    return session.scalars(stmt).one_or_none()


def set_rate_limit(session: Session, *, prefix: str, rate_limit: str | None) -> ApiKey | None:
    """Give the key its own limit (``None``: the default again); ``None`` if no key has
    that prefix."""
    stmt = (
        update(ApiKey)
        .where(ApiKey.prefix == prefix)
        .values(rate_limit=rate_limit)
        .returning(ApiKey)
    )
    return session.scalars(stmt).one_or_none()
