"""/v1/jobs: submit, poll (with long-poll), list, cancel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import AfterValidator
from sqlalchemy import or_, select

from api import key_limits
from api.auth import Caller, current_caller
from api.openapi_responses import API_KEY, keyed
from api.problems import Problem
from api.schemas import JobCreate, JobOut, JobPage
from api.submit import accept
from api.waiters import read_off_loop
from tierq import transitions
from tierq.db import session_scope
from tierq.models import TERMINAL_STATUSES, Job, JobStatus
from tierq.webhook_urls import UnsafeWebhookURL, check_url

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _usable_key(value: str | None) -> str | None:
    # An empty key was stored as '' and the next one then hit the unique index (a 500:
    # submit's lookup skips a falsy key); a control character cannot be stored (Postgres
    # refuses NUL) or sent back in a header.
    if value is not None and not value.strip():
        raise ValueError("must not be empty or only whitespace")
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255),
    AfterValidator(_usable_key),
]


def check_webhook_target(body: JobCreate) -> None:
    """The network half of the ``webhook_url`` check (the field's validator does the
    syntax): its host must not resolve to a non-public address. Waits for DNS, so it runs
    in a worker thread (sync endpoints, or ``run_in_threadpool``), never on the loop."""
    if body.webhook_url is None:
        return
    try:
        check_url(body.webhook_url)
    except UnsafeWebhookURL as exc:
        raise Problem(
            422,
            "Invalid request",
            f"webhook_url: {exc}",
            errors=[{"field": "webhook_url", "message": str(exc)}],
        ) from None


def submit_response(
    request: Request, caller: Caller, body: JobCreate, idempotency_key: str | None
) -> Response:
    check_webhook_target(body)  # called from sync endpoints: already off the event loop
    key_limits.admit_job(caller, idempotency_key)  # 429 at the key's jobs at once
    accepted = accept(caller.key_id, body, idempotency_key, request.app.state.tier_config)
    headers = {"Location": f"/v1/jobs/{accepted.job.id}"}
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
    # Serialized once here; returning the model would make FastAPI validate it again.
    return Response(
        JobOut.of(accepted.job).model_dump_json(),
        status_code=202,
        headers=headers,
        media_type="application/json",
    )


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    dependencies=[API_KEY],
    responses=keyed(404, body=True),
)
def submit_job(
    request: Request,
    body: JobCreate,
    caller: Annotated[Caller, Depends(current_caller)],
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return submit_response(request, caller, body, idempotency_key)


def load_job(caller: Caller, job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == caller.key_id))
    if job is None:
        raise Problem(404, "Job not found", f"No job {job_id} for this key.")
    return job


async def wait_for_end(
    request: Request,
    caller: Caller,
    job_id: uuid.UUID,
    wait: float,
    stop_at: Collection[str] = TERMINAL_STATUSES,
) -> Job:
    """The job, once it has ended (or reached another status in ``stop_at``) or ``wait``
    seconds have passed, whichever comes first. The job is read once, then again only when
    the process's waiters (``api.waiters``) say it changed. The deadline is the loop's
    clock: a read still queued for a thread when it passes is abandoned, and the job as
    last read is returned, so the wait never overruns."""
    waiters = request.app.state.waiters
    until = asyncio.get_running_loop().time() + wait
    with waiters.watch(str(job_id)) as changed:
        # Watched before the first read: a change while it runs sets ``changed``.
        job = await run_in_threadpool(load_job, caller, job_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                while job.status not in stop_at:
                    await changed.wait()
                    changed.clear()  # before the read: a change during it is not missed
                    job = await read_off_loop(load_job, caller, job_id)
        return job


@router.get("/{job_id}", response_model=JobOut, dependencies=[API_KEY], responses=keyed(404, 422))
async def get_job(
    request: Request,
    job_id: uuid.UUID,
    caller: Annotated[Caller, Depends(current_caller)],
    wait: Annotated[float, Query(ge=0, le=60, description="Long-poll up to this many s")] = 0,
) -> JobOut:
    if not wait:
        return JobOut.of(await run_in_threadpool(load_job, caller, job_id))
    with key_limits.waiting(request, caller):  # a long-poll holds one of the key's waiters
        return JobOut.of(await wait_for_end(request, caller, job_id, wait))


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, TypeError) as exc:
        raise Problem(
            422,
            "Invalid request",
            "cursor: not a cursor this API returned",
            errors=[{"field": "cursor", "message": "malformed"}],
        ) from exc


@router.get("", response_model=JobPage, dependencies=[API_KEY], responses=keyed(422))
def list_jobs(
    caller: Annotated[Caller, Depends(current_caller)],
    status: Annotated[JobStatus | None, Query()] = None,
    tier: Annotated[str | None, Query(max_length=64)] = None,
    conversation_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobPage:
    query = select(Job).where(Job.owner_id == caller.key_id)
    if status:
        query = query.where(Job.status == status)
    if tier:
        query = query.where(Job.tier == tier)
    if conversation_id:
        query = query.where(Job.conversation_id == conversation_id)
    if cursor:
        created, last_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, (Job.created_at == created) & (Job.id < last_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with session_scope() as session:
        jobs = list(session.scalars(query))
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return JobPage(
        data=[JobOut.of(j) for j in jobs],
        next_cursor=_encode_cursor(jobs[-1]) if more else None,
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    dependencies=[API_KEY],
    responses=keyed(404, 409, 422),
)
def cancel_job(job_id: uuid.UUID, caller: Annotated[Caller, Depends(current_caller)]) -> JobOut:
    """Cancel an active job. A running job's backend call is aborted within a second."""
    with session_scope() as session:
        cancelled = transitions.cancel(session, job_id, caller.key_id, "cancelled by the client")
    job = load_job(caller, job_id)
    if not cancelled:
        raise Problem(
            409, "Job already ended", f"Job {job_id} is {job.status}.", status_value=job.status
        )
    return JobOut.of(job)
