"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

import flywheel
from flywheel.api.errors import install_error_handlers
from flywheel.api.limits import BodySizeLimit
from flywheel.api.routers import evaluations, feedback, health, signals
from flywheel.db.engine import create_db_engine, session_factory
from flywheel.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. The database engine is created at startup and disposed at shutdown."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(settings, pre_ping=False)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        # Database work runs in worker threads, at most one per pooled connection.
        app.state.db_limiter = anyio.CapacityLimiter(settings.db_pool_size)
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="flywheel",
        version=flywheel.__version__,
        summary="Signals in: evaluation results, mined bad cases and user feedback.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    install_error_handlers(app)
    for module in (health, feedback, evaluations, signals):
        app.include_router(module.router)
    return app
