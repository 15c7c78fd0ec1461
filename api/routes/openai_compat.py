"""The OpenAI API surface: ``POST /v1/chat/completions`` and ``GET /v1/models``.

An unmodified OpenAI SDK client works against tierq. A chat completion becomes a durable
job like any ``POST /v1/jobs``; the call then waits for the answer up to
``TIERQ_CHAT_WAIT_SECONDS`` (never longer than the read timeout the SDK announces in
``x-stainless-read-timeout``) and returns a standard ``chat.completion``. Where the answer
came from is in ``x-tierq-*`` headers; ``x-request-id`` is the job id (the SDK exposes it as
``_request_id`` on answers and ``request_id`` on errors).

When the answer is not there in time the job keeps running: the client gets a retryable
error naming the job (504 if it is still in progress, 503 with ``Retry-After`` if it is
parked), and the same request with the same ``Idempotency-Key`` waits for that job instead
of starting another.

The OpenAI SDK retries 408, 409, 429 and 5xx (twice by default) with the same headers,
but it sends no ``Idempotency-Key`` of its own: it makes one up for non-GET requests and
keeps it in memory. So a retry is harmless only if the caller passed a key (with
``extra_headers``); every retryable error here says ``x-should-retry: true`` if the
request had a key and ``false`` if not, since a retry without one would run the request a
second time. Errors have the OpenAI shape ``{"error": {message, type, param, code}}``,
which is what the SDK reads, inside an RFC 9457 problem body.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationInfo, field_validator
from sqlalchemy import select

from api import disconnect, key_limits
from api.auth import Caller, current_caller
from api.chat_request import StreamOptions
from api.openapi_responses import API_KEY, errors, event_stream, keyed
from api.problems import PROBLEM_JSON, Problem
from api.routes.chat_stream import stream_job
from api.routes.jobs import IdempotencyKey, check_webhook_target, wait_for_end
from api.schemas import JobCreate
from api.submit import accept
from tierq import routes
from tierq.db import session_scope
from tierq.models import TERMINAL_STATUSES, Attempt, Job, JobStatus
from tierq.settings import get_settings

# The read timeout the SDK announces; the wait ends this much earlier so the answer (or
# the error naming the job) reaches the client before it gives up and retries blindly.
READ_TIMEOUT_MARGIN = 1.0
WAIT_TIMEOUT_RETRY_AFTER = 1  # the retry itself waits again, so it may come at once

STARTED = int(time.time())

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def _error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")


def _openai_error(body: dict[str, Any], status: int) -> dict[str, Any]:
    errors = body.get("errors") or []
    return {
        "message": body.get("detail") or body.get("title") or f"HTTP {status}",
        "type": _error_type(status),
        "param": errors[0].get("field") if errors else None,
        "code": None,
    }


async def _handled(request: Request, exc: Exception) -> Response | None:
    """What the application's own exception handler (the problem+json one) makes of it."""
    handlers = request.app.exception_handlers
    handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:
        return None
    response = handler(request, exc)
    return await response if inspect.isawaitable(response) else response


def _with_openai_error(response: Response) -> Response:
    if not isinstance(response, JSONResponse):
        return response
    body = json.loads(bytes(response.body))
    if not isinstance(body, dict) or "error" in body:
        return response
    body["error"] = _openai_error(body, response.status_code)
    headers = {
        k: v
        for k, v in response.headers.items()
        if k.lower() not in ("content-length", "content-type")
    }
    return JSONResponse(
        body, status_code=response.status_code, headers=headers, media_type=PROBLEM_JSON
    )


class OpenAIErrorRoute(APIRoute):
    """Errors of these routes, including auth and validation, also carry OpenAI's
    ``error`` object: the SDK builds its exception message from ``error.message``."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                response = await _handled(request, exc)
                if response is None:
                    raise
                return _with_openai_error(response)

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)


def _problem(
    status: int,
    title: str,
    message: str,
    code: str,
    *,
    param: str | None = None,
    job: Job | None = None,
    headers: dict[str, str] | None = None,
) -> Problem:
    error: dict[str, Any] = {
        "message": message,
        "type": _error_type(status),
        "param": param,
        "code": code,
    }
    extra: dict[str, Any] = {}
    if param:
        extra["errors"] = [{"field": param, "message": message.removeprefix(f"{param}: ")}]
    if job is not None:
        error["job_id"] = str(job.id)
        extra.update(job_id=str(job.id), status_value=job.status)
    return Problem(status, title, message, headers=headers, error=error, **extra)


class ChatCompletionCreate(JobCreate):
    """The OpenAI chat-completions body (tierq's options may ride along in the body)."""

    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stream")
    @classmethod
    def _one_streamed_choice(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and (info.data.get("n") or 1) > 1:
            raise ValueError("a streamed answer carries one choice: send n=1 or stream=false")
        return value

    def job(self) -> JobCreate:
        """The job this request becomes: the same job, and the same Idempotency-Key
        fingerprint, as the same chat sent to ``POST /v1/jobs``, streamed or not."""
        return JobCreate.model_validate(
            self.model_dump(exclude={"stream", "stream_options"}, exclude_none=True)
        )


def _wait_seconds(read_timeout: str | None) -> float:
    wait = get_settings().chat_wait_seconds
    try:
        client_timeout = float(read_timeout) if read_timeout else math.inf
    except ValueError:
        client_timeout = math.inf
    if math.isfinite(client_timeout) and client_timeout > 0:
        wait = min(wait, client_timeout - READ_TIMEOUT_MARGIN)
    return max(wait, 0.0)


def _job_headers(job: Job) -> dict[str, str]:
    headers = {"x-request-id": str(job.id), "x-tierq-job-id": str(job.id)}
    served = {
        "tier": job.tier,
        "backend": job.backend,
        "model": job.model,
        "quality": job.quality,
        "attempts": job.attempts,
    }
    headers.update({f"x-tierq-{k}": str(v) for k, v in served.items() if v is not None})
    return headers


def _last_error_class(job_id: uuid.UUID) -> str | None:
    with session_scope() as session:
        return session.scalar(
            select(Attempt.error_class)
            .where(Attempt.job_id == job_id)
            .order_by(Attempt.id.desc())
            .limit(1)
        )


def _seconds_until(when: datetime | None) -> int:
    if when is None:
        return WAIT_TIMEOUT_RETRY_AFTER
    left = (when - datetime.now(UTC)).total_seconds()  # type: ignore[operator]
    return max(1, math.ceil(left))


def _past_deadline(job: Job) -> bool:
    ended = job.finished_at or job.updated_at
    deadline = job.deadline
    return deadline is not None and ended is not None and ended >= deadline


async def _failure(job: Job, keyed: bool) -> Problem:
    """The error for a job that did not succeed (or not in time)."""
    headers = {**_job_headers(job), "Location": f"/v1/jobs/{job.id}"}
    retry = {"x-should-retry": "true" if keyed else "false"}
    again = (
        "Send the same request with the same Idempotency-Key to keep waiting for it"
        if keyed
        else f"Poll GET /v1/jobs/{job.id} for its answer (sending the request again without "
        "an Idempotency-Key would run it a second time)"
    )
    if job.status == JobStatus.PARKED:
        return _problem(
            503,
            "Job parked",
            f"Job {job.id} is parked: {job.error}. It is kept and replayed when a backend "
            f"recovers. {again}.",
            "job_parked",
            job=job,
            headers={**headers, **retry, "Retry-After": str(_seconds_until(job.due_at))},
        )
    if job.status not in TERMINAL_STATUSES:
        return _problem(
            504,
            "Answer not ready",
            f"Job {job.id} has no answer yet (it is {job.status}); it was accepted and will "
            f"run to completion. {again}.",
            "job_not_finished",
            job=job,
            headers={**headers, **retry, "Retry-After": str(WAIT_TIMEOUT_RETRY_AFTER)},
        )
    # A job that ended stays ended: the same key would return the same error again.
    headers["x-should-retry"] = "false"
    if job.status == JobStatus.CANCELLED:
        message = f"Job {job.id} was cancelled: {job.error}"
        return _problem(409, "Job cancelled", message, "job_cancelled", job=job, headers=headers)
    if job.status == JobStatus.DEAD:
        return _problem(
            500,
            "Job dead",
            f"Job {job.id} was given up after repeated deliveries: {job.error}",
            "job_dead",
            job=job,
            headers=headers,
        )
    message = f"Job {job.id} failed: {job.error}"
    error_class = await run_in_threadpool(_last_error_class, job.id)
    if error_class == "context_length":
        code = "context_length_exceeded"
        return _problem(
            400, "Job failed", message, code, param="messages", job=job, headers=headers
        )
    if error_class == "client":
        return _problem(400, "Job failed", message, "backend_refused", job=job, headers=headers)
    if _past_deadline(job):
        return _problem(504, "Job failed", message, "deadline_exceeded", job=job, headers=headers)
    return _problem(502, "Job failed", message, "job_failed", job=job, headers=headers)


@router.post(
    "/chat/completions",
    dependencies=[API_KEY],
    responses={
        200: event_stream("The answer: JSON, or with `stream: true` its chunks as they come."),
        **keyed(404, 409, 500, 502, 504, body=True),
    },
)
async def create_chat_completion(
    request: Request,
    body: ChatCompletionCreate,
    caller: Annotated[Caller, Depends(current_caller)],
    idempotency_key: IdempotencyKey = None,
    read_timeout: Annotated[str | None, Header(alias="x-stainless-read-timeout")] = None,
) -> Response:
    await run_in_threadpool(check_webhook_target, body)  # DNS: never on the event loop
    wait = _wait_seconds(read_timeout)
    # The call waits for its answer: it holds one of the key's waiters (refused before
    # anything is written, as is a key at its jobs at once).
    with key_limits.waiting(request, caller) as slot:
        await run_in_threadpool(key_limits.admit_job, caller, idempotency_key)
        config = request.app.state.tier_config
        accepted = await run_in_threadpool(
            accept, caller.key_id, body.job(), idempotency_key, config, bool(body.stream)
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return slot.stream(
                stream_job(request, caller, accepted.job, include_usage, wait),
                media_type="text/event-stream",
                headers={
                    "x-request-id": str(accepted.job.id),
                    "x-tierq-job-id": str(accepted.job.id),
                    "Cache-Control": "no-cache",
                },
            )
        waiting = wait_for_end(
            request, caller, accepted.job.id, wait, stop_at=TERMINAL_STATUSES | {JobStatus.PARKED}
        )
        if not disconnect.wanted(request, caller):
            job = await waiting  # a client that goes away leaves its job running
        else:
            try:
                job = await disconnect.unless_gone(request, waiting)
            except disconnect.ClientGone:
                await disconnect.cancel_job(accepted.job.id, caller)
                return Response(status_code=499)  # nobody is listening any more
    if job.status != JobStatus.SUCCEEDED or job.result is None:
        raise await _failure(job, keyed=idempotency_key is not None)
    headers = _job_headers(job)
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(json.dumps(job.result), headers=headers, media_type="application/json")


def _model(name: str, owner: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": owner, **extra}


@router.get("/models", dependencies=[API_KEY, Depends(current_caller)], responses=errors(401, 429))
def list_models(request: Request) -> dict[str, Any]:
    """The routes: each model name a request may send (aliases too), with its chain of
    tiers. Without routes, any name is accepted: the alias ``tierq`` and the models the
    tiers' backends serve are listed, every one of them running down all the tiers."""
    config = request.app.state.tier_config
    if not config.routes:
        return {"object": "list", "data": _tiers_models(config)}
    data = []
    for route in config.routes:
        chain = [step.tier for step in route.chain]
        where = {"chain": chain, "aliases": route.aliases,
                 "default": route.model == config.default_route}  # fmt: skip
        data.append(_model(route.model, "tierq", tierq=where))
        data += [_model(a, "tierq", tierq={"alias_of": route.model}) for a in route.aliases]
    return {"object": "list", "data": data}


def _tiers_models(config: Any) -> list[dict[str, Any]]:
    served: dict[str, dict[str, list[str]]] = {}
    for tier in config.tiers:
        for backend in tier.backends:
            entry = served.setdefault(backend.model, {"tiers": [], "backends": []})
            if tier.name not in entry["tiers"]:
                entry["tiers"].append(tier.name)
            entry["backends"].append(backend.name)
    data = [_model(routes.DEFAULT_ROUTE, "tierq", tierq={"alias": True})]
    return data + [_model(name, "tierq", tierq=where) for name, where in served.items()]
