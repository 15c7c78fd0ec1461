"""/v1/jobs/{id}/deliveries: the log of a job's webhook deliveries, and redelivery."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.auth import Caller, current_caller
from api.openapi_responses import API_KEY, keyed
from api.problems import Problem
from api.routes.jobs import load_job
from tierq.db import session_scope
from tierq.models import WebhookDelivery
from tierq.webhooks import DeliveryStatus, redeliver, webhook_settings

router = APIRouter(prefix="/v1/jobs", tags=["webhooks"])
webhook_settings()  # a malformed TIERQ_WEBHOOK_* variable stops the API at start


class DeliveryAttempt(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status; null: no answer.")
    error: str | None
    duration_ms: float


class DeliveryOut(BaseModel):
    id: str = Field(description="The webhook-id header: the same on every attempt.")
    object: Literal["tierq.webhook_delivery"] = "tierq.webhook_delivery"
    job_id: uuid.UUID
    type: str = Field(description="The event, e.g. job.succeeded or job.parked.")
    url: str
    status: Literal["pending", "sending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None = Field(description="When a pending delivery is tried.")
    expires_at: datetime = Field(description="Retries stop after this; then failed.")
    delivered_at: datetime | None
    created_at: datetime
    updated_at: datetime
    attempt_log: list[DeliveryAttempt] = Field(description="The latest attempts, oldest first.")

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryOut:
        return cls(
            id=row.id,
            job_id=row.job_id,
            type=row.event_type,
            url=row.url,
            status=row.status,  # type: ignore[arg-type]
            attempts=row.attempts,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            next_attempt_at=(row.next_attempt_at if row.status == DeliveryStatus.PENDING else None),
            expires_at=row.expires_at,  # type: ignore[arg-type]
            delivered_at=row.delivered_at,
            created_at=row.created_at,  # type: ignore[arg-type]
            updated_at=row.updated_at,  # type: ignore[arg-type]
            attempt_log=[DeliveryAttempt.model_validate(e) for e in _log(row.attempt_log)],
        )


def _log(entries: Any) -> list[dict[str, Any]]:
    return [e for e in entries or [] if isinstance(e, dict)]


class DeliveryPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]


DeliveryId = Annotated[str, Path(max_length=80)]


@router.get(
    "/{job_id}/deliveries",
    response_model=DeliveryPage,
    dependencies=[API_KEY],
    responses=keyed(404, 422),
)
def list_deliveries(
    job_id: uuid.UUID, caller: Annotated[Caller, Depends(current_caller)]
) -> DeliveryPage:
    load_job(caller, job_id)  # 404 unless the job is this key's
    with session_scope() as session:
        rows = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id, WebhookDelivery.owner_id == caller.key_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        ).all()
        return DeliveryPage(data=[DeliveryOut.of(r) for r in rows])


@router.post(
    "/{job_id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=DeliveryOut,
    dependencies=[API_KEY],
    responses=keyed(404, 409, 422),
)
def redeliver_delivery(
    job_id: uuid.UUID,
    delivery_id: DeliveryId,
    caller: Annotated[Caller, Depends(current_caller)],
) -> DeliveryOut:
    """Send the event again now (same webhook-id, fresh retry window), whatever its status,
    unless an attempt is in flight."""
    with session_scope() as session:
        found = redeliver(session, caller.key_id, job_id, delivery_id)
        if found is None:
            raise Problem(
                404,
                "Delivery not found",
                f"No delivery {delivery_id} of job {job_id} for this key.",
            )
        if isinstance(found, str):
            raise Problem(
                409,
                "Delivery in flight",
                f"Delivery {delivery_id} is being attempted now; try again when it is done.",
                status_value=found,
            )
        return DeliveryOut.of(found)
