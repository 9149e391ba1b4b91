"""Engine and session factories, built from settings on demand."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from flywheel.db.embedded import start_embedded_postgres
from flywheel.settings import Settings


def database_url(settings: Settings) -> str:
    """The SQLAlchemy URL to use: ``FLYWHEEL_DATABASE_URL``, else the embedded server's."""
    if settings.database_url is None:
        return start_embedded_postgres(settings.pgdata_path)
    url = make_url(settings.database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.drivername != "postgresql+psycopg":
        raise ValueError(
            "FLYWHEEL_DATABASE_URL must be a PostgreSQL URL (postgresql://...), "
            f"got {url.drivername!r}"
        )
    return url.render_as_string(hide_password=False)


def create_db_engine(settings: Settings, *, pool_size: int | None = None) -> Engine:
    """An engine over a fixed-size pool whose checkouts first test the connection, so a
    restarted database is reconnected to transparently."""
    return create_engine(
        database_url(settings),
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_timeout=10,
    )


def create_async_db_engine(settings: Settings) -> AsyncEngine:
    """The API's engine: psycopg's async mode over a fixed-size pool whose checkouts first
    test the connection (a restarted database is reconnected to without an error); a
    connection that dies after its ping is covered by the API retrying its idempotent work
    once (``flywheel.api.deps.run_authorized``)."""
    return create_async_engine(
        database_url(settings),
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_timeout=10,
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
