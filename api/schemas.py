"""Request and response bodies. Requests are OpenAI chat completions plus tierq's options."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from tierq.models import Job, Turn
from tierq.webhook_urls import WebhookURL

Role = Literal["system", "user", "assistant"]


def _no_nul(value: str) -> str:
    # Postgres text and jsonb cannot hold U+0000: refused here, as bad input naming the
    # field, rather than by the database as a server error after the request was taken.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Text = Field(min_length=1, max_length=1_000_000)
    name: Text | None = Field(None, max_length=64)


class ChatParams(BaseModel):
    """The OpenAI chat-completions parameters tierq passes on to a backend."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=255)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: Text | None = Field(None, max_length=256)


class TierqOptions(BaseModel):
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    deadline: datetime | None = Field(None, description="After this the job fails unanswered.")
    on_exhausted: Literal["degrade", "park", "fail"] | None = None

    @field_validator("deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("must include a timezone offset, e.g. 2026-01-01T00:00:00Z")
        # In UTC, as every stored time: SQLite keeps a datetime's wall time and drops its
        # offset, so 12:00+02:00 would be read back as 12:00 UTC, two hours late.
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range") from None


class JobCreate(ChatParams, TierqOptions):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    conversation_id: uuid.UUID | None = None
    stream: Literal[False] | None = Field(None, description="Use /v1/chat/completions to stream.")
    webhook_url: WebhookURL | None = Field(
        None,
        description="Receives the job, signed (Standard Webhooks), when it ends or is parked; "
        "default: the API key's. Must be a public http(s) address.",
    )

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if value and value[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return value

    def params(self) -> dict[str, Any]:
        """What is stored with the job and sent to the backend besides the conversation."""
        return self.model_dump(include=set(ChatParams.model_fields), exclude_none=True)


class MessageCreate(JobCreate):
    """``POST /v1/conversations/{id}/messages``: the conversation comes from the path."""

    conversation_id: None = Field(None, exclude=True)


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: Text | None = Field(None, min_length=1, max_length=100_000)


class ServedBy(BaseModel):
    tier: str
    backend: str | None
    model: str | None
    quality: str | None
    attempts: int

    @classmethod
    def of(cls, job: Job) -> ServedBy:
        return cls(
            tier=job.tier,
            backend=job.backend,
            model=job.model,
            quality=job.quality,
            attempts=job.attempts,
        )


class JobOut(BaseModel):
    id: uuid.UUID
    object: Literal["tierq.job"] = "tierq.job"
    status: str
    conversation_id: uuid.UUID
    priority: int
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    deliveries: int
    served_by: ServedBy
    result: dict[str, Any] | None
    error: str | None
    retry_after: datetime | None = Field(None, description="When a parked job is next tried.")
    webhook_url: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            status=job.status,
            conversation_id=job.conversation_id,
            priority=job.priority,
            deadline=job.deadline,
            created_at=job.created_at,  # type: ignore[arg-type]
            updated_at=job.updated_at,  # type: ignore[arg-type]
            finished_at=job.finished_at,
            deliveries=job.deliveries,
            served_by=ServedBy.of(job),
            result=job.result,
            error=job.error,
            retry_after=job.due_at if job.status == "parked" else None,
            webhook_url=job.webhook_url,
        )


class JobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    next_cursor: str | None


class TurnOut(BaseModel):
    seq: int
    role: str
    content: str
    job_id: uuid.UUID | None
    created_at: datetime

    @classmethod
    def of(cls, turn: Turn) -> TurnOut:
        return cls(
            seq=turn.seq,
            role=turn.role,
            content=turn.content,
            job_id=turn.job_id,
            created_at=turn.created_at,  # type: ignore[arg-type]
        )


class ConversationOut(BaseModel):
    id: uuid.UUID
    object: Literal["tierq.conversation"] = "tierq.conversation"
    created_at: datetime
    turns: list[TurnOut]
    pending_jobs: list[uuid.UUID]
