"""Creating, checking and revoking API keys.

A key reads ``fwk_<prefix>_<secret>``. The prefix identifies the key in listings and
logs; the whole key is stored only as its SHA-256 (keys are 256-bit random tokens, so a
fast hash is the right one: there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from flywheel.auth import repository
from flywheel.auth.rate_limit import normalized_rate_limit
from flywheel.db.models import ApiKey, Scope

KEY_PATTERN = re.compile(r"^fwk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
APP_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's app and scopes."""

    app: str
    scopes: frozenset[Scope]
    key_prefix: str
    rate_limit: str | None = None
    """The key's own request limit; ``None``: the API's default."""

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key: ``secret`` is shown once and never stored."""

    secret: str
    record: ApiKey


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(raw: Iterable[str]) -> list[Scope]:
    """Scopes from user input; raises ``ValueError`` naming an unknown one."""
    scopes: list[Scope] = []
    for item in raw:
        name = item.strip().lower()
        if not name:
            continue
        try:
            scope = Scope(name)
        except ValueError:
            valid = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {item!r} (valid: {valid})") from None
        if scope not in scopes:
            scopes.append(scope)
    if not scopes:
        raise ValueError("at least one scope is required")
    return scopes


def create_api_key(
    session: Session, *, app: str, scopes: Iterable[Scope], rate_limit: str | None = None
) -> CreatedKey:
    """A new key of ``app``; ``rate_limit`` (``"50/second"``, or ``"off"``) replaces the
    API's default limit for it. Raises ``ValueError`` on a bad app name or limit."""
    if not APP_PATTERN.fullmatch(app):
        raise ValueError(
            f"invalid app name {app!r}: 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if rate_limit is not None:
        rate_limit = normalized_rate_limit(rate_limit)
    prefix = secrets.token_hex(6)
    secret = f"fwk_{prefix}_{secrets.token_urlsafe(32)}"
    record = repository.insert_api_key(
        session,
        app=app,
        prefix=prefix,
        secret_hash=hash_secret(secret),
        scopes=[s.value for s in scopes],
        rate_limit=rate_limit,
    )
    return CreatedKey(secret=secret, record=record)


def authenticate(session: Session, *, secret: str) -> Principal | None:
    """The principal for a presented key, or ``None`` if it is malformed, unknown or revoked."""
    if not KEY_PATTERN.fullmatch(secret):
        return None
    found = repository.get_active_key_by_hash(session, secret_hash=hash_secret(secret))
    if found is None:
        return None
    app, prefix, scopes, rate_limit = found
    return Principal(
        app=app,
        scopes=frozenset(Scope(s) for s in scopes),
        key_prefix=prefix,
        rate_limit=rate_limit,
    )
