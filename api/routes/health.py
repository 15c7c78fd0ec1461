"""Kubernetes probes: live (the process answers), ready (database and broker reachable);
and the state of every configured backend."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select, text

from api.auth import Caller, current_caller
from tierq.broker import get_celery
from tierq.config import BackendConfig
from tierq.db import get_engine, session_scope
from tierq.models import Backend, Circuit, Health

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
def live() -> dict[str, str]:
    return {"status": "ok"}


def _check_database() -> str:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"fail: {type(exc).__name__}"
    return "ok"


def _check_broker() -> str:
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return f"fail: {type(exc).__name__}"
    return "ok"


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    checks = {
        "database": await run_in_threadpool(_check_database),
        "broker": await run_in_threadpool(_check_broker),
    }
    ok = all(v == "ok" for v in checks.values())
    body = {
        "status": "ok" if ok else "fail",
        "checks": checks,
        "config_version": request.app.state.tier_config.version,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


def _backend_view(tier: str, backend: BackendConfig, row: Backend | None) -> dict[str, Any]:
    # Field by field on purpose: BackendConfig carries the api_key property, never shown.
    return {
        "name": backend.name,
        "tier": tier,
        "protocol": backend.protocol,
        "url": backend.url,
        # A backend no worker has touched yet has no row; these are the row's defaults.
        "health": row.health if row else Health.UNKNOWN,
        "circuit": row.circuit if row else Circuit.CLOSED,
        "disabled": row.disabled if row else False,
        "last_probe_at": row.last_probe_at if row else None,
        "last_latency_ms": row.last_latency_ms if row else None,
        "last_error": row.last_error if row else None,
        # What the server's model list said at the last probe (None: unknown), and why the
        # configured model is not among them.
        "served_models": row.served_models if row else None,
        "model_error": row.model_error if row else None,
    }


@router.get("/backends")
def backends(request: Request, _: Annotated[Caller, Depends(current_caller)]) -> dict[str, Any]:
    """Every configured backend, in tier order, with its shared state from the database."""
    config = request.app.state.tier_config
    with session_scope() as session:
        rows = {
            row.name: row
            for row in session.scalars(
                select(Backend).where(Backend.name.in_(list(config.backends)))
            )
        }
    data = [
        _backend_view(tier.name, backend, rows.get(backend.name))
        for tier in config.tiers
        for backend in tier.backends
    ]
    return {"object": "list", "data": data}
