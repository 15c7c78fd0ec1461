"""Kubernetes probes: live (the process answers), ready (database and broker reachable);
and the state of every configured backend."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select, text

from api.auth import Caller, current_caller
from api.openapi_responses import API_KEY, keyed
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


@router.get(
    "/ready",
    responses={503: {"description": "A check failed: the body names it (same shape as 200)."}},
)
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


TierState = Literal["live", "degraded", "down"]


class TierStatus(BaseModel):
    tier: str
    status: TierState = Field(
        description="live: every backend can take calls; degraded: some can; down: none can."
    )


class BackendsOut(BaseModel):
    object: Literal["list"] = "list"
    tiers: list[TierStatus]
    data: list[dict[str, Any]] | None = Field(
        None, description="Admin keys only: each backend, its URL, errors and breaker."
    )


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


def _usable(row: Backend | None) -> tuple[bool, bool]:
    """Whether a backend takes calls at all, and whether it does so at full strength."""
    if row is None:  # no worker has touched it: the row's defaults, unknown and closed
        return True, True
    takes = not row.disabled and Health(row.health).up and row.circuit != Circuit.OPEN
    full = takes and row.health != Health.DEGRADED and row.circuit == Circuit.CLOSED
    return takes, full


def _tier_status(rows: list[Backend | None]) -> TierState:
    usable = [_usable(row) for row in rows]
    if not any(takes for takes, _ in usable):
        return "down"
    return "live" if all(full for _, full in usable) else "degraded"


@router.get(
    "/backends",
    response_model=BackendsOut,
    response_model_exclude_unset=True,
    dependencies=[API_KEY],
    responses=keyed(),
)
def backends(request: Request, caller: Annotated[Caller, Depends(current_caller)]) -> BackendsOut:
    """Each tier: live, degraded or down. Admin keys also see every backend, in tier order,
    with its shared state from the database; other keys see no URL, error or model name."""
    config = request.app.state.tier_config
    with session_scope() as session:
        rows = {
            row.name: row
            for row in session.scalars(
                select(Backend).where(Backend.name.in_(list(config.backends)))
            )
        }
    tiers = [
        TierStatus(tier=tier.name, status=_tier_status([rows.get(b.name) for b in tier.backends]))
        for tier in config.tiers
    ]
    # Set explicitly: the response leaves out what was not set (data, for other keys).
    if not caller.is_admin:
        return BackendsOut(object="list", tiers=tiers)
    data = [
        _backend_view(tier.name, backend, rows.get(backend.name))
        for tier in config.tiers
        for backend in tier.backends
    ]
    return BackendsOut(object="list", tiers=tiers, data=data)
