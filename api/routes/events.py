"""``GET /v1/jobs/{id}/events``: the job's events as Server-Sent Events.

Each event's SSE id is its row id in ``job_events``, so a client that reconnects with
``Last-Event-ID`` gets exactly the events after it: none lost, none twice. The stream ends
after the job's final event. Wake-ups come from the same notifications as long-polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.auth import Caller, current_caller
from api.problems import Problem
from api.routes.jobs import load_job
from api.schemas import utc
from tierq.db import session_scope
from tierq.models import Job, JobEvent, JobStatus

router = APIRouter(tags=["jobs"])
KEEPALIVE_SECONDS = 15.0


def _frame(event_id: int, kind: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"kind": kind, **data}, default=str)
    return f"id: {event_id}\nevent: {kind}\ndata: {payload}\n\n".encode()


def _since(job_id: uuid.UUID, after: int) -> tuple[list[JobEvent], str]:
    """The events after ``after``, and the job's status as it was before they were read.

    Status first: each statement has its own snapshot (READ COMMITTED), and the final
    event commits with the terminal status, so a terminal status read first guarantees
    the events read next include the final one. Read the other way round, a commit in
    between would end the stream without its last event.
    """
    with session_scope() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        events = list(
            session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after)
                .order_by(JobEvent.id)
            )
        )
    return events, status or ""


def _parse_last_id(value: str | None) -> int:
    if value is None:
        return -1
    try:
        parsed = int(value)
    except ValueError:
        parsed = -2
    if parsed < 0:
        raise Problem(
            422,
            "Invalid request",
            "Last-Event-ID: not an id this API sent",
            errors=[{"field": "Last-Event-ID", "message": "must be an event id"}],
        )
    return parsed


async def _stream(request: Request, job: Job, after: int) -> AsyncIterator[bytes]:
    waiters = request.app.state.waiters
    with waiters.watch(str(job.id)) as wake:
        if after < 0:  # a fresh watcher first learns the job exists; its id 0 is before all
            yield _frame(0, "queued", {"job_id": str(job.id), "at": utc(job.created_at)})
            after = 0
        while True:
            wake.clear()
            events, status = await run_in_threadpool(_since, job.id, after)
            for event in events:
                after = event.id
                yield _frame(
                    event.id,
                    event.kind,
                    {"job_id": str(job.id), **event.detail, "at": utc(event.created_at)},
                )
            if status and JobStatus(status).terminal:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(KEEPALIVE_SECONDS, waiters.recheck_seconds))
                continue
            yield b": keepalive\n\n"


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_events(
    request: Request,
    job_id: uuid.UUID,
    caller: Annotated[Caller, Depends(current_caller)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    after = _parse_last_id(last_event_id)
    job = await run_in_threadpool(load_job, caller, job_id)
    return StreamingResponse(
        _stream(request, job, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
