"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import make_url

from api import allow, docs_pages, problems
from api.limits import RequestLimits
from api.routes import (
    admin,
    conversations,
    deliveries,
    events,
    health,
    jobs,
    metrics,
    openai_compat,
)
from api.waiters import JobWaiters
from tierq.config import TierqConfig, load_config
from tierq.settings import get_settings


def _listen_dsn(database_url: str) -> str | None:
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def create_app(config: TierqConfig | None = None) -> FastAPI:
    settings = get_settings()
    tier_config = config or load_config(settings.config)
    waiters = JobWaiters(_listen_dsn(settings.effective_database_url))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        waiters.start()
        yield
        await waiters.stop()

    app = FastAPI(
        title="tierq",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # docs_pages: pinned assets with integrity, none in production
        redoc_url=None,
        exception_handlers={405: allow.method_not_allowed},
    )
    docs_pages.install(app, settings.production)
    app.state.tier_config = tier_config
    app.state.waiters = waiters
    problems.install(app)
    # Outside the routes and their exception handlers: a refused body is never parsed,
    # and its key never looked up.
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        body_timeout=settings.body_timeout,
    )
    for module in (jobs, deliveries, events, conversations, health, admin, metrics, openai_compat):
        app.include_router(module.router)
    return app
