"""Kubernetes probes: live (the process answers), ready (database and broker reachable)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from tierq.broker import get_celery
from tierq.db import get_engine

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
