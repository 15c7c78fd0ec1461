"""Accepting a job: the conversation turns and the job are committed in one transaction.

Only after the commit is the job's doorbell published (the fast path). If the process dies
in between, or the broker is down, the relay publishes it from the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from api.problems import Problem
from api.schemas import JobCreate
from tierq import broker, routes
from tierq.config import TierqConfig
from tierq.crash import crash_point
from tierq.db import db_now, transaction
from tierq.features import needs
from tierq.messages import turn_values
from tierq.models import Conversation, Job, JobStatus, Turn

JobRow = Any  # a row of the jobs table: the attributes of a Job


@dataclass(frozen=True)
class Accepted:
    job: JobRow
    replayed: bool  # an earlier request with the same Idempotency-Key made this job


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


_JOBS = Job.__table__
_CONVERSATIONS = Conversation.__table__
# Built once: this is the hot path, and a statement built per request costs more CPU than
# the database spends running it. Parameters fill in the columns at execute time.
_INSERT_CONVERSATION = insert(_CONVERSATIONS)
_INSERT_TURNS = insert(Turn.__table__)
_INSERT_JOB = {
    # A blocked job is published when the job before it ends; NULL tells the relay.
    True: insert(_JOBS).returning(_JOBS),
    False: insert(_JOBS).values(published_at=db_now()).returning(_JOBS),
}
_UNPUBLISHED = update(_JOBS).values(published_at=None)


def _existing(conn: Connection, owner: uuid.UUID, key: str, digest: str) -> JobRow | None:
    job = conn.execute(
        select(_JOBS).where(_JOBS.c.owner_id == owner, _JOBS.c.idempotency_key == key)
    ).one_or_none()
    if job is not None and job.request_hash != digest:
        raise Problem(
            422,
            "Idempotency-Key reused",
            "This Idempotency-Key was used with a different request body.",
            errors=[{"field": "Idempotency-Key", "message": "reused with a different body"}],
        )
    return job


def _reserve_turns(
    conn: Connection, owner: uuid.UUID, conversation_id: uuid.UUID | None, count: int
) -> tuple[uuid.UUID, int]:
    """Reserve ``count`` turn positions (the messages plus the answer); return the first."""
    if conversation_id is None:
        conversation_id = uuid.uuid4()
        conn.execute(
            _INSERT_CONVERSATION, {"id": conversation_id, "owner_id": owner, "turn_count": count}
        )
        return conversation_id, 0
    # UPDATE ... RETURNING takes the row lock, so concurrent appends get disjoint positions.
    end = conn.scalar(
        update(_CONVERSATIONS)
        .where(_CONVERSATIONS.c.id == conversation_id, _CONVERSATIONS.c.owner_id == owner)
        .values(turn_count=_CONVERSATIONS.c.turn_count + count)
        .returning(_CONVERSATIONS.c.turn_count)
    )
    if end is None:
        raise Problem(
            404,
            "Conversation not found",
            f"No conversation {conversation_id} for this key.",
            errors=[{"field": "conversation_id", "message": "not found"}],
        )
    return conversation_id, end - count


@dataclass(frozen=True)
class Request:
    """A job request's chat parts, dumped once: what is stored and what routing reads."""

    params: dict[str, Any]  # what the backend is sent besides the messages
    messages: list[dict[str, Any]]

    @classmethod
    def of(cls, body: JobCreate) -> Request:
        return cls(body.params(), body.message_dicts())


def route_of(body: JobCreate, request: Request, config: TierqConfig) -> tuple[routes.Chain, str]:
    """The request's route and the tier its job starts on; a Problem if there is none: an
    unknown model (404, OpenAI's ``model_not_found``), or a request that needs what no
    backend of the route can do (400 naming the field)."""
    try:
        chain = routes.resolve(config, body.model)
    except routes.ModelNotFound:
        message = f"The model '{body.model}' does not exist; GET /v1/models lists them."
        raise Problem(
            404, "Model not found", message,
            errors=[{"field": "model", "message": "no route serves this model"}],
            error={"message": message, "type": "invalid_request_error", "param": "model",
                   "code": "model_not_found"},
        ) from None  # fmt: skip
    first = chain.first_tier(needs({**request.params, "messages": request.messages}))
    if isinstance(first, routes.Unservable):
        message = f"{first.field}: {first} (model '{body.model}')"
        raise Problem(
            400, "Request not servable", message,
            errors=[{"field": first.field, "message": str(first)}],
            error={"message": message, "type": "invalid_request_error", "param": first.field,
                   "code": "unsupported_feature"},
        )  # fmt: skip
    return chain, first


def _turn_row(conversation_id: uuid.UUID, seq: int, message: dict[str, Any]) -> dict[str, Any]:
    return {"id": uuid.uuid4(), "conversation_id": conversation_id, "seq": seq,
            **turn_values(message)}  # fmt: skip


def _previous_job(conn: Connection, conversation_id: uuid.UUID, before_seq: int) -> JobRow | None:
    return conn.execute(
        select(_JOBS.c.id, _JOBS.c.status)
        .where(_JOBS.c.conversation_id == conversation_id, _JOBS.c.answer_seq < before_seq)
        .order_by(_JOBS.c.answer_seq.desc())
        .limit(1)
    ).one_or_none()


def _insert(
    conn: Connection,
    owner: uuid.UUID,
    body: JobCreate,
    key: str | None,
    digest: str,
    config: TierqConfig,
    stream: bool = False,
) -> tuple[JobRow, bool]:
    request = Request.of(body)
    chain, tier = route_of(body, request, config)
    conversation_id, first = _reserve_turns(
        conn, owner, body.conversation_id, len(body.messages) + 1
    )
    conn.execute(
        _INSERT_TURNS,
        [
            _turn_row(conversation_id, first + offset, message)
            for offset, message in enumerate(request.messages)
        ],
    )
    answer_seq = first + len(body.messages)
    previous = _previous_job(conn, conversation_id, answer_seq) if body.conversation_id else None
    blocked = previous is not None and not JobStatus(previous.status).terminal
    values = {
        "id": uuid.uuid4(),
        "owner_id": owner,
        "conversation_id": conversation_id,
        "after_job_id": previous.id if previous else None,
        "answer_seq": answer_seq,
        "status": JobStatus.QUEUED,
        "tier": tier,
        "route": chain.model,
        "priority": body.priority,
        "deadline": body.deadline,
        # A streamed job's worker sends its tokens out as they come; the flag is not part
        # of the request hash, so the same chat streamed or not is the same job.
        "request": {**request.params, **({"stream": True} if stream else {})},
        "idempotency_key": key,
        "request_hash": digest,
        "on_exhausted": body.on_exhausted,
        "webhook_url": body.webhook_url,
    }
    return conn.execute(_INSERT_JOB[blocked], values).one(), blocked


def _publish(job: JobRow) -> None:
    """Ring the doorbell; if the broker is unreachable, tell the relay to publish it."""
    if broker.publish(job.id, job.tier):
        return
    # Best effort: should this fail too, the relay republishes after its usual wait.
    with contextlib.suppress(SQLAlchemyError), transaction() as conn:
        conn.execute(_UNPUBLISHED.where(_JOBS.c.id == job.id, _JOBS.c.status == JobStatus.QUEUED))


def accept(
    owner: uuid.UUID, body: JobCreate, key: str | None, config: TierqConfig, stream: bool = False
) -> Accepted:
    digest = request_hash(body)
    try:
        with transaction() as conn:
            if key and (job := _existing(conn, owner, key, digest)):
                return Accepted(job, replayed=True)
            job, blocked = _insert(conn, owner, body, key, digest, config, stream)
    except IntegrityError:
        if not key:
            raise
        # Two requests with one Idempotency-Key raced; the other one committed first.
        with transaction() as conn:
            job = _existing(conn, owner, key, digest)
        if job is None:
            raise
        return Accepted(job, replayed=True)
    crash_point("api.after_commit")
    if not blocked:
        _publish(job)
    return Accepted(job, replayed=False)
