"""Accepting a job: the conversation turns and the job are committed in one transaction.

Only after the commit is the job's doorbell published (the fast path). If the process dies
in between, or the broker is down, the relay publishes it from the database.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.problems import Problem
from api.schemas import JobCreate
from tierq import broker
from tierq.config import TierqConfig
from tierq.crash import crash_point
from tierq.db import db_now, session_scope
from tierq.models import Conversation, Job, JobStatus, Turn

JobRow = Any  # a Job, or a row of the jobs table: the same attributes


@dataclass(frozen=True)
class Accepted:
    job: JobRow
    replayed: bool  # an earlier request with the same Idempotency-Key made this job


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _existing(session: Session, owner: uuid.UUID, key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.owner_id == owner, Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise Problem(
            422,
            "Idempotency-Key reused",
            "This Idempotency-Key was used with a different request body.",
            errors=[{"field": "Idempotency-Key", "message": "reused with a different body"}],
        )
    return job


def _reserve_turns(
    session: Session, owner: uuid.UUID, conversation_id: uuid.UUID | None, count: int
) -> tuple[uuid.UUID, int]:
    """Reserve ``count`` turn positions (the messages plus the answer); return the first."""
    if conversation_id is None:
        conversation_id = uuid.uuid4()
        session.execute(
            insert(Conversation).values(id=conversation_id, owner_id=owner, turn_count=count)
        )
        return conversation_id, 0
    # UPDATE ... RETURNING takes the row lock, so concurrent appends get disjoint positions.
    end = session.scalar(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.owner_id == owner)
        .values(turn_count=Conversation.turn_count + count)
        .returning(Conversation.turn_count)
    )
    if end is None:
        raise Problem(
            404,
            "Conversation not found",
            f"No conversation {conversation_id} for this key.",
            errors=[{"field": "conversation_id", "message": "not found"}],
        )
    return conversation_id, end - count


def _previous_job(session: Session, conversation_id: uuid.UUID, before_seq: int) -> Job | None:
    return session.scalar(
        select(Job)
        .where(Job.conversation_id == conversation_id, Job.answer_seq < before_seq)
        .order_by(Job.answer_seq.desc())
        .limit(1)
    )


def _insert(
    session: Session,
    owner: uuid.UUID,
    body: JobCreate,
    key: str | None,
    digest: str,
    config: TierqConfig,
    stream: bool = False,
) -> tuple[JobRow, bool]:
    # Core inserts, not the unit of work: this is the hot path, and three statements do.
    conversation_id, first = _reserve_turns(
        session, owner, body.conversation_id, len(body.messages) + 1
    )
    session.execute(
        insert(Turn),
        [
            {
                "id": uuid.uuid4(),
                "conversation_id": conversation_id,
                "seq": first + offset,
                "role": message.role,
                "content": message.content,
            }
            for offset, message in enumerate(body.messages)
        ],
    )
    answer_seq = first + len(body.messages)
    previous = _previous_job(session, conversation_id, answer_seq) if body.conversation_id else None
    blocked = previous is not None and not JobStatus(previous.status).terminal
    values = {
        "id": uuid.uuid4(),
        "owner_id": owner,
        "conversation_id": conversation_id,
        "after_job_id": previous.id if previous else None,
        "answer_seq": answer_seq,
        "status": JobStatus.QUEUED,
        "tier": config.tier_names[0],
        "priority": body.priority,
        "deadline": body.deadline,
        # A streamed job's worker sends its tokens out as they come; the flag is not part
        # of the request hash, so the same chat streamed or not is the same job.
        "request": {**body.params(), **({"stream": True} if stream else {})},
        "idempotency_key": key,
        "request_hash": digest,
        "on_exhausted": body.on_exhausted,
        "webhook_url": body.webhook_url,
        # A blocked job is published when the job before it ends; NULL tells the relay.
        "published_at": None if blocked else db_now(),
    }
    # The table, not the mapped class: ORM bulk inserts turn SQL expressions into parameters.
    table = Job.__table__
    job = session.execute(insert(table).values(values).returning(table)).one()
    return job, blocked


def accept(
    owner: uuid.UUID, body: JobCreate, key: str | None, config: TierqConfig, stream: bool = False
) -> Accepted:
    digest = request_hash(body)
    try:
        with session_scope() as session:
            if key and (job := _existing(session, owner, key, digest)):
                return Accepted(job, replayed=True)
            job, blocked = _insert(session, owner, body, key, digest, config, stream)
    except IntegrityError:
        if not key:
            raise
        # Two requests with one Idempotency-Key raced; the other one committed first.
        with session_scope() as session:
            job = _existing(session, owner, key, digest)
        if job is None:
            raise
        return Accepted(job, replayed=True)
    crash_point("api.after_commit")
    if not blocked:
        broker.publish(job.id, job.tier)
    return Accepted(job, replayed=False)
