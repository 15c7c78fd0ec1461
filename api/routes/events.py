"""``GET /v1/jobs/{id}/events``: the job's events as Server-Sent Events.

Each event's SSE id is its row id in ``job_events``, so a client that reconnects with
``Last-Event-ID`` gets exactly the events after it: none lost, none twice. The stream ends
after the job's final event. Wake-ups come from the same notifications as long-polls.

A browser's EventSource cannot send an Authorization header, so a key holder may ask for
a watch token (``POST /v1/jobs/{id}/watch-token``): valid for that one job's events, for a
few minutes, as ``?token=`` on this endpoint only. It is signed with the server's secret
(``api.watch_tokens``), so nothing is stored; it names its key, and a revoked key's tokens
are refused. The expiry is checked when a stream starts; a stream that started keeps going.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select

from api import key_limits, watch_tokens
from api.auth import Caller, current_caller
from api.openapi_responses import API_KEY, event_stream, keyed
from api.problems import Problem
from api.routes.jobs import load_job
from api.waiters import first_of
from tierq.db import session_scope
from tierq.models import ApiKey, Job, JobEvent, JobStatus

router = APIRouter(tags=["jobs"])
KEEPALIVE_SECONDS = 15.0
# An id this API sent: digits, within the range of the ids' column (a longer number would
# be a database error, not a 422).
LastEventId = Header(
    alias="Last-Event-ID",
    pattern=r"^[0-9]{1,18}$",
    description="Resume after this event: the id of the last event received.",
)
WATCH_TOKEN_SECONDS = 300


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


async def _stream(request: Request, job: Job, after: int) -> AsyncIterator[bytes]:
    waiters = request.app.state.waiters
    with waiters.watch(str(job.id)) as changed:
        if after < 0:  # a fresh watcher first learns the job exists; its id 0 is before all
            yield _frame(0, "queued", {"job_id": str(job.id), "at": job.created_at})
            after = 0
        while True:
            # Cleared before the read: an event committed during it sets ``changed`` again.
            changed.clear()
            events, status = await run_in_threadpool(_since, job.id, after)
            for event in events:
                after = event.id
                yield _frame(
                    event.id,
                    event.kind,
                    {"job_id": str(job.id), **event.detail, "at": event.created_at},
                )
            if status and JobStatus(status).terminal:
                return
            # Read again only when the process's waiters say the job changed (api.waiters).
            while not await first_of(changed, timeout=KEEPALIVE_SECONDS):
                yield b": keepalive\n\n"


# -- watch tokens ------------------------------------------------------------------------


class WatchToken(BaseModel):
    token: str
    expires_at: datetime
    url: str  # the events URL with the token, for EventSource


def _key_is_live(key_id: uuid.UUID) -> bool:
    with session_scope() as session:
        found = session.scalar(
            select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        )
    return found is not None


def _invalid_token(reason: str) -> Problem:
    return Problem(
        401,
        "Unauthorized",
        f"token: {reason}; ask POST /v1/jobs/{{id}}/watch-token for a new one",
        errors=[{"field": "token", "message": reason}],
    )


def _token_caller(token: str, job_id: uuid.UUID) -> Caller:
    grant = watch_tokens.verify(token, job_id)
    if grant is None or not _key_is_live(grant.key_id):
        raise _invalid_token("not valid for this job")
    if grant.expires <= time.time():
        raise _invalid_token("expired")
    return Caller(grant.key_id, is_admin=False)


async def events_caller(
    request: Request,
    job_id: uuid.UUID,
    token: Annotated[
        str | None, Query(max_length=200, description="A watch token instead of a key.")
    ] = None,
) -> Caller:
    if token is None:
        return await current_caller(request)
    return await run_in_threadpool(_token_caller, token, job_id)


def _new_watch_token(caller: Caller, job_id: uuid.UUID) -> WatchToken:
    load_job(caller, job_id)  # 404 unless the job is this key's
    if not _key_is_live(caller.key_id):  # revoked since it was cached
        raise Problem(401, "Unauthorized", "The API key is not valid.")
    expires = int(time.time()) + WATCH_TOKEN_SECONDS
    token = watch_tokens.sign(job_id, caller.key_id, expires)
    return WatchToken(
        token=token,
        expires_at=datetime.fromtimestamp(expires, UTC),
        url=f"/v1/jobs/{job_id}/events?token={token}",
    )


@router.post(
    "/v1/jobs/{job_id}/watch-token",
    status_code=201,
    response_model=WatchToken,
    dependencies=[API_KEY],
    responses=keyed(404, 422),
)
def create_watch_token(
    job_id: uuid.UUID, caller: Annotated[Caller, Depends(current_caller)]
) -> WatchToken:
    """A token that lets a browser's EventSource (which cannot send Authorization) follow
    this job's events for the next few minutes: ``GET /v1/jobs/{id}/events?token=``."""
    return _new_watch_token(caller, job_id)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    dependencies=[API_KEY],
    responses={200: event_stream("The job's events, to its final one."), **keyed(404, 422)},
)
async def job_events(
    request: Request,
    job_id: uuid.UUID,
    caller: Annotated[Caller, Depends(events_caller)],
    # `str`, not `str | None`: a header is absent or a string, never null (a nullable
    # header in the document reads as one that may be sent as "null").
    last_event_id: Annotated[str, LastEventId] = None,  # type: ignore[assignment]  # noqa: RUF013
) -> StreamingResponse:
    after = -1 if last_event_id is None else int(last_event_id)
    with key_limits.waiting(request, caller) as slot:  # a stream is one of the key's waiters
        job = await run_in_threadpool(load_job, caller, job_id)
        return slot.stream(
            _stream(request, job, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
