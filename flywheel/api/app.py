"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker

import flywheel
from flywheel.api.errors import install_error_handlers
from flywheel.api.limits import BodySizeLimit
from flywheel.api.routers import evaluations, feedback, health, review, signals
from flywheel.auth.rate_limit import build_rate_limiter
from flywheel.db.engine import create_async_db_engine
from flywheel.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. The database engine is created at startup and disposed at shutdown."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_async_db_engine(settings)
        app.state.engine = engine
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        app.state.rate_limiter = build_rate_limiter(
            default=settings.rate_limit, redis_url=settings.redis_url
        )
        try:
            yield
        finally:
            await app.state.rate_limiter.aclose()
            await engine.dispose()

    app = FastAPI(
        title="flywheel",
        version=flywheel.__version__,
        summary="Signals in: evaluation results, mined bad cases and user feedback.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    install_error_handlers(app)
    for module in (health, feedback, evaluations, signals, review):
        app.include_router(module.router)
    return app
