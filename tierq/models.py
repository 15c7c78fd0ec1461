"""The database schema: the record of every key, conversation, turn, job and backend call."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
)
from sqlalchemy import (
    false as sa_false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tierq.db import UTCDateTime

JsonType = JSON().with_variant(JSONB(), "postgresql")
Timestamp = UTCDateTime()


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    PARKED = "parked"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


class Circuit(StrEnum):
    """A backend's circuit breaker (worker.circuit makes the transitions)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Health(StrEnum):
    """What the last probe said of a backend (worker.health)."""

    UNKNOWN = "unknown"  # not probed yet: given the benefit of the doubt
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # answers, slowly
    DOWN = "down"

    @property
    def up(self) -> bool:
        return self in (Health.UNKNOWN, Health.HEALTHY, Health.DEGRADED)


TERMINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.DEAD}
)
ACTIVE_STATUSES = frozenset(JobStatus) - TERMINAL_STATUSES


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JsonType, datetime: Timestamp}
    # Server-side values (timestamps from the database clock) come back through RETURNING,
    # so a row is complete after flush without a second SELECT.
    __mapper_args__ = {"eager_defaults": True}


def _uuid() -> uuid.UUID:
    return uuid.uuid4()


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=_uuid)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    revoked_at: Mapped[datetime | None]
    # Signs this key's webhooks (Standard Webhooks "whsec_..."). Unlike the key it cannot be
    # stored only as a hash: the delivery worker needs the plain secret to sign. It is shown
    # once, at creation, and never logged. NULL for keys created before webhooks existed.
    webhook_secret: Mapped[str | None] = mapped_column(String(128))
    # Where this key's jobs are announced when a job names no webhook_url of its own.
    default_webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # A chat-completions client that disconnects cancels its job (unless its request's
    # x-tierq-cancel-on-disconnect header says otherwise).
    cancel_on_disconnect: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=sa_false()
    )
    # The key's own limits (api/key_limits.py); NULL: the default from settings; 0: none.
    rps: Mapped[float | None] = mapped_column(Float)
    max_jobs: Mapped[int | None] = mapped_column(Integer)
    max_waiters: Mapped[int | None] = mapped_column(Integer)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=_uuid)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"), index=True)
    # Next free turn position; bumped with UPDATE ... RETURNING so concurrent appends serialize.
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Turn(Base):
    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_turns_conversation_seq"),
        # The promise "one answer per job" is this constraint, not application care.
        UniqueConstraint("job_id", name="uq_turns_job_answer"),
        CheckConstraint(
            "role IN ('system', 'developer', 'user', 'assistant', 'tool')", name="ck_turns_role"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=_uuid)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id"))
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    # The message's text (its text parts joined; "" when it has none, e.g. an assistant
    # turn that only calls tools): what people read and what the minimal tier matches on.
    content: Mapped[str] = mapped_column(Text)
    # The whole message as the client sent it or the backend answered it (content parts,
    # tool calls, tool_call_id, name, refusal); NULL for a plain text message.
    message: Mapped[dict[str, Any] | None]
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", name="fk_turns_job"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_idempotency"),
        Index("ix_jobs_status_tier", "status", "tier"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        # A key's jobs by status: the count of its jobs not ended, at every submit.
        Index("ix_jobs_owner_status", "owner_id", "status"),
        # A conversation's previous job (submit) and the jobs waiting for one that ended
        # (the worker, on every answer): without these each is a scan of every job.
        Index("ix_jobs_conversation_answer", "conversation_id", "answer_seq"),
        Index("ix_jobs_after_job", "after_job_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=_uuid)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id"))
    # The job runs after this one (the previous turn's job in the same conversation) ends.
    after_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    answer_seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    tier: Mapped[str] = mapped_column(String(64))
    # The route (the request's model, resolved) whose chain of tiers the job runs down;
    # NULL on jobs from before routes: the configuration's default route.
    route: Mapped[str | None] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    deadline: Mapped[datetime | None]
    request: Mapped[dict[str, Any]]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    on_exhausted: Mapped[str | None] = mapped_column(String(16))
    # Hash of the normalized request (model, messages, parameters): the minimal tier's
    # cache answers a job with the latest good answer to the same request.
    cache_key: Mapped[str | None] = mapped_column(String(64), index=True)
    # Set when the job must run on one backend (a larger context window than the last).
    pinned_backend: Mapped[str | None] = mapped_column(String(128))

    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # Leases that ran out because their worker died mid-job: a job whose every delivery
    # kills its worker is a poison job. Retries, escalations and replays do not count.
    lost_leases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The backend this job's worker is calling right now (NULL between calls): running
    # jobs with a live lease and this set are a backend's calls in flight.
    calling_backend: Mapped[str | None] = mapped_column(String(128), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    tier_attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    published_at: Mapped[datetime | None]
    due_at: Mapped[datetime | None]

    result: Mapped[dict[str, Any] | None]
    backend: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(255))
    quality: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None]
    # Receives the job, signed, when it ends or is parked (NULL: the key's default, if any).
    webhook_url: Mapped[str | None] = mapped_column(String(2048))


class Attempt(Base):
    """One backend call: the outage record."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), index=True)
    tier: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(128))
    worker: Mapped[str] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))  # "ok" or "error"
    error_class: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Backend(Base):
    """Shared state of one backend: health, circuit breaker, operator switch.

    Every worker process on every machine reads and updates this one row, so a breaker
    opened by one worker is open for all of them.
    """

    __tablename__ = "backends"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    tier: Mapped[str] = mapped_column(String(64))
    health: Mapped[str] = mapped_column(String(16), default=Health.UNKNOWN)
    circuit: Mapped[str] = mapped_column(String(16), default=Circuit.CLOSED)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Disabled "now" by an operator (a model that must be retired at once): its calls in
    # flight are aborted and rerouted, and the minimal tier serves none of its answers.
    retired: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    opened_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    window_started_at: Mapped[datetime | None]
    window_calls: Mapped[int] = mapped_column(Integer, default=0)
    window_failures: Mapped[int] = mapped_column(Integer, default=0)
    window_retries: Mapped[int] = mapped_column(Integer, default=0)
    trial_until: Mapped[datetime | None]  # a half-open trial call is in flight until then
    trial_successes: Mapped[int] = mapped_column(Integer, default=0)
    last_probe_at: Mapped[datetime | None]
    last_latency_ms: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    # The models the server says it serves (its model list, at the last probe), and why
    # the configured model is not among them; NULL when it is or nobody could tell.
    served_models: Mapped[list[str] | None] = mapped_column(JsonType)
    model_error: Mapped[str | None] = mapped_column(Text)
    # The last call a worker got an answer to: a live backend needs no canary to say so.
    last_answer_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class CircuitTransition(Base):
    """Every breaker state change, with its time and reason: the outage timeline."""

    __tablename__ = "circuit_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backend: Mapped[str] = mapped_column(ForeignKey("backends.name"), index=True)
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class JobEvent(Base):
    """What happened to a job, in order: claimed, calling, retrying, escalated, parked, …"""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class WebhookDelivery(Base):
    """One webhook event for one job: the outbox row, written in the transaction that ended
    (or parked) the job, and the log of its delivery attempts.

    The id is the Standard Webhooks ``webhook-id``: stable per event, so a repeated
    transition cannot make a second row and receivers can drop repeated deliveries.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), index=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    # The exact body sent on every attempt (the signature covers these bytes).
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    expires_at: Mapped[datetime]  # retries stop after this (database clock)
    published_at: Mapped[datetime | None]
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_expires_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
