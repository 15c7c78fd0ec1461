"""Request and response bodies. Requests are OpenAI chat completions plus tierq's options."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.chat_request import ANSWERABLE_LAST, ChatParams, Message, Text
from api.limits import arrived_at
from tierq.messages import as_message
from tierq.models import Job, Turn
from tierq.settings import get_settings
from tierq.webhook_urls import WebhookURL


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
            value = value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range") from None
        # Judged against the request's arrival, not the clock: the chat route validates
        # the request twice, with a DNS lookup in between.
        if value <= arrived_at():
            raise ValueError("is in the past")
        return value


# tierq's own fields of a job request: everything else is the chat request a backend gets.
TIERQ_FIELDS = frozenset(
    {"messages", "conversation_id", "stream", "stream_options", "webhook_url", "priority",
     "deadline", "on_exhausted"}
)  # fmt: skip


class JobCreate(ChatParams, TierqOptions):
    messages: list[Message] = Field(min_length=1)  # at most TIERQ_MAX_MESSAGES
    conversation_id: uuid.UUID | None = None
    stream: Literal[False] | None = Field(None, description="Use /v1/chat/completions to stream.")
    webhook_url: WebhookURL | None = Field(
        None,
        description="Receives the job, signed (Standard Webhooks), when it ends or is parked; "
        "default: the API key's. Must be a public http(s) address.",
    )

    @field_validator("messages", mode="before")
    @classmethod
    def _not_too_many(cls, value: Any) -> Any:
        # Before the messages are validated one by one: a long list is refused for its length.
        limit = get_settings().max_messages
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"at most {limit} messages (TIERQ_MAX_MESSAGES); got {len(value)}")
        return value

    @model_validator(mode="after")
    def _storable_size(self) -> JobCreate:
        # What the database keeps of the job: its messages (as turns) and its parameters,
        # as UTF-8 JSON. The body limit counts bytes on the wire; this counts the job.
        limit = get_settings().max_job_bytes
        size = len(self.model_dump_json(exclude_none=True).encode())
        if size > limit:
            raise ValueError(
                f"the job takes {size} bytes as stored; at most {limit} (TIERQ_MAX_JOB_BYTES)"
            )
        return self

    @field_validator("messages")
    @classmethod
    def _ends_with_a_question(cls, value: list[Message]) -> list[Message]:
        if value and value[-1].role not in ANSWERABLE_LAST:
            raise ValueError("the last message must have role 'user' or 'tool'")
        return value

    def params(self) -> dict[str, Any]:
        """What is stored with the job and sent to the backend besides the conversation:
        the chat parameters, unknown ones (server extras) included."""
        return self.model_dump(exclude=TIERQ_FIELDS, exclude_none=True)

    def message_dicts(self) -> list[dict[str, Any]]:
        """The messages as sent (unset optional fields left out)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]


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
    content: str = Field(description="The message's text (text parts joined).")
    message: dict[str, Any] = Field(
        description="The whole message: content parts, tool calls, tool_call_id, refusal."
    )
    job_id: uuid.UUID | None
    created_at: datetime

    @classmethod
    def of(cls, turn: Turn) -> TurnOut:
        return cls(
            seq=turn.seq,
            role=turn.role,
            content=turn.content,
            message=as_message(turn.role, turn.content, turn.message),
            job_id=turn.job_id,
            created_at=turn.created_at,  # type: ignore[arg-type]
        )


class ConversationOut(BaseModel):
    id: uuid.UUID
    object: Literal["tierq.conversation"] = "tierq.conversation"
    created_at: datetime
    turns: list[TurnOut]
    pending_jobs: list[uuid.UUID]
