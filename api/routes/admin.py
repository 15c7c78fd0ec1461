"""/v1/admin: operator controls. Needs an admin key (``tierq keys create NAME --admin``)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Caller, admin_caller
from api.openapi_responses import API_KEY, keyed
from api.problems import Problem
from api.schemas import JobOut
from tierq import operations
from tierq.db import session_scope

router = APIRouter(prefix="/v1/admin", tags=["admin"])
Admin = Annotated[Caller, Depends(admin_caller)]
RETIRE_NOW = "Also abort its calls in flight (rerouted) and withhold its cached answers."


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(
        None, ge=1, le=100_000, description="At most this many; all if absent"
    )
    job_ids: list[uuid.UUID] | None = Field(None, max_length=10_000)


def _switch(request: Request, name: str, disabled: bool, now: bool = False) -> dict[str, Any]:
    try:
        with session_scope() as session:
            config = request.app.state.tier_config
            row = operations.set_disabled(session, config, name, disabled, now)
            return operations.describe(row)
    except operations.UnknownBackend as exc:
        raise Problem(
            404,
            "Backend not found",
            f"No backend '{name}' in the tier configuration.",
            errors=[{"field": "name", "message": "unknown backend"}],
        ) from exc


@router.post("/backends/{name}/disable", dependencies=[API_KEY], responses=keyed(403, 404, 422))
def disable_backend(
    request: Request,
    name: str,
    _: Admin,
    now: Annotated[
        bool,
        Query(
            description="Also abort its calls in flight (rerouted) and withhold its cached answers"
        ),
    ] = False,
) -> dict[str, Any]:
    return _switch(request, name, True, now)


@router.post("/backends/{name}/enable", dependencies=[API_KEY], responses=keyed(403, 404, 422))
def enable_backend(request: Request, name: str, _: Admin) -> dict[str, Any]:
    return _switch(request, name, False)


@router.get("/parked", dependencies=[API_KEY], responses=keyed(403, 422))
def list_parked(_: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    with session_scope() as session:
        jobs = operations.parked(session, limit)
    return {"object": "list", "data": [JobOut.of(j).model_dump(mode="json") for j in jobs]}


@router.post("/replay", dependencies=[API_KEY], responses=keyed(403, body=True))
def force_replay(request: Request, body: ReplayRequest, _: Admin) -> dict[str, Any]:
    with session_scope() as session:
        released = operations.replay(
            session, request.app.state.tier_config, body.limit, body.job_ids
        )
    return {"replayed": [str(j) for j in released]}
