"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import make_url

from api import problems
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

    app = FastAPI(title="tierq", version="0.1.0", lifespan=lifespan)
    app.state.tier_config = tier_config
    app.state.waiters = waiters
    problems.install(app)
    for module in (jobs, deliveries, events, conversations, health, admin, metrics, openai_compat):
        app.include_router(module.router)
    return app
