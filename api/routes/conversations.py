"""/v1/conversations: a conversation is its ordered turns; each new message creates a job.

A message may arrive while the previous turn's job is still pending (after an outage this
is the normal case). It is accepted at once; its user turn takes the next position, after
the position reserved for the pending answer, and its job runs only after the previous job
has ended, so its context includes that answer and turns never interleave.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select

from api.auth import Caller, current_caller
from api.openapi_responses import API_KEY, keyed
from api.problems import Problem
from api.routes.jobs import IdempotencyKey, submit_response
from api.schemas import (
    ConversationCreate,
    ConversationOut,
    JobCreate,
    JobOut,
    MessageCreate,
    TurnOut,
)
from tierq.db import session_scope
from tierq.models import ACTIVE_STATUSES, Conversation, Job, Turn

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


def _load(session, caller: Caller, conversation_id: uuid.UUID) -> ConversationOut:  # type: ignore[no-untyped-def]
    conversation = session.scalar(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.owner_id == caller.key_id
        )
    )
    if conversation is None:
        raise Problem(404, "Conversation not found", f"No conversation {conversation_id}.")
    turns = session.scalars(
        select(Turn).where(Turn.conversation_id == conversation_id).order_by(Turn.seq)
    )
    pending = session.scalars(
        select(Job.id)
        .where(Job.conversation_id == conversation_id, Job.status.in_(ACTIVE_STATUSES))
        .order_by(Job.answer_seq)
    )
    return ConversationOut(
        id=conversation.id,
        created_at=conversation.created_at,  # type: ignore[arg-type]
        turns=[TurnOut.of(t) for t in turns],
        pending_jobs=list(pending),
    )


@router.post(
    "",
    status_code=201,
    response_model=ConversationOut,
    dependencies=[API_KEY],
    responses=keyed(body=True),
)
def create_conversation(
    body: ConversationCreate, caller: Annotated[Caller, Depends(current_caller)]
) -> ConversationOut:
    with session_scope() as session:
        conversation = Conversation(owner_id=caller.key_id, turn_count=1 if body.system else 0)
        session.add(conversation)
        session.flush()
        if body.system:
            session.add(
                Turn(conversation_id=conversation.id, seq=0, role="system", content=body.system)
            )
            session.flush()
        return _load(session, caller, conversation.id)


@router.get(
    "/{conversation_id}",
    response_model=ConversationOut,
    dependencies=[API_KEY],
    responses=keyed(404, 422),
)
def get_conversation(
    conversation_id: uuid.UUID, caller: Annotated[Caller, Depends(current_caller)]
) -> ConversationOut:
    with session_scope() as session:
        return _load(session, caller, conversation_id)


@router.post(
    "/{conversation_id}/messages",
    status_code=202,
    response_model=JobOut,
    dependencies=[API_KEY],
    responses=keyed(404, body=True),
)
def post_message(
    request: Request,
    conversation_id: uuid.UUID,
    body: MessageCreate,
    caller: Annotated[Caller, Depends(current_caller)],
    idempotency_key: IdempotencyKey = None,
) -> Response:
    job_body = JobCreate.model_validate(
        {**body.model_dump(exclude_none=True), "conversation_id": conversation_id}
    )
    return submit_response(request, caller, job_body, idempotency_key)
