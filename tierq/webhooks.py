"""Webhooks: what both sides share. The outbox row, the payload, signing, and the
settings. The guard against server-side request forgery (checking a webhook URL, pinning
the checked address) is in ``tierq.webhook_urls``.

A job's webhook is an outbox row (``webhook_deliveries``) written in the very transaction
that ended or parked the job (``record_delivery``, called from
``tierq.events.notify_job_changed``), so an event is never announced for a change that
rolled back, nor lost for one that committed. The relay publishes due rows to the
``webhooks`` queue; a delivery worker claims a row (pending → sending, with a lease), posts
it, and writes the outcome. Retry timing lives in the row, on the database clock.

Signatures follow the Standard Webhooks specification (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>``) with the
``standardwebhooks`` reference library.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from tierq.db import db_now
from tierq.models import ApiKey, Job, JobStatus, WebhookDelivery

QUEUE = "webhooks"  # the Celery queue deliveries run on (`tierq worker --tier webhooks`)
DELIVER = "tierq.deliver_webhook"
SECRET_PREFIX = "whsec_"
ANNOUNCED = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.DEAD, JobStatus.PARKED}
)


class DeliveryStatus:
    PENDING = "pending"  # waiting for next_attempt_at; the relay publishes it when due
    SENDING = "sending"  # claimed by a delivery worker (lease_expires_at)
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up: no 2xx before expires_at


class WebhookSettings(BaseSettings):
    """``TIERQ_WEBHOOK_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TIERQ_WEBHOOK_", extra="ignore")

    allow_private: bool = Field(
        False,
        description="Allow receivers on loopback, link-local, private and other non-public "
        "addresses (development, or receivers inside your own network).",
    )
    max_age: float = Field(
        24 * 3600.0, gt=0, description="Seconds after the event to keep retrying; then failed."
    )
    backoff_base: float = Field(10.0, gt=0, description="Delay before the first retry, s.")
    backoff_cap: float = Field(3600.0, gt=0, description="Longest delay between retries, s.")
    timeout: float = Field(10.0, gt=0, description="Per-request connect/read/write timeout, s.")
    lease_seconds: float = Field(
        60.0, gt=0, description="A claimed delivery not finished in this long is tried again."
    )
    republish_after: float = Field(
        60.0, gt=0, description="A due delivery published this long ago is published again."
    )
    resolve_timeout: float = Field(
        2.0, gt=0, description="How long submit waits for DNS to check a webhook_url's host."
    )


def webhook_settings() -> WebhookSettings:
    # Not cached: cheap, and read only when a webhook is actually involved.
    return WebhookSettings()


# -- secrets and signatures ------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign_headers(secret: str, message_id: str, body: str, timestamp: int) -> dict[str, str]:
    signature = Webhook(secret).sign(message_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": "tierq-webhooks",
    }


def backoff(attempts: int, settings: WebhookSettings) -> float:
    """Seconds before the next try after ``attempts`` failed ones: exponential, capped,
    with jitter (half fixed, half random) so receivers coming back are not stampeded."""
    delay = min(settings.backoff_cap, settings.backoff_base * 2 ** max(attempts - 1, 0))
    return delay / 2 + random.uniform(0, delay / 2)


# -- the event payload -----------------------------------------------------------------


def job_view(job: Any) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (``api.schemas.JobOut``), as JSON values.

    Built here because ``tierq`` may not import ``api``; tests/test_webhooks.py checks
    that the two stay the same.
    """
    view = {
        "id": job.id,
        "object": "tierq.job",
        "status": job.status,
        "conversation_id": job.conversation_id,
        "priority": job.priority,
        "deadline": job.deadline,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
        "deliveries": job.deliveries,
        "served_by": {
            "tier": job.tier,
            "backend": job.backend,
            "model": job.model,
            "quality": job.quality,
            "attempts": job.attempts,
        },
        "result": job.result,
        "error": job.error,
        "retry_after": job.due_at if job.status == JobStatus.PARKED else None,
        "webhook_url": job.webhook_url,
    }
    return to_jsonable_python(view)


def event_id(job_id: uuid.UUID, status: str, deliveries: int) -> str:
    """The ``webhook-id``: stable per event. A job ends once, so its terminal status names
    the event; it may be parked again after a replay, and each parking follows a new claim,
    so the claim count tells one parking from the next."""
    if status == JobStatus.PARKED:
        return f"msg_{job_id.hex}_parked_{deliveries}"
    return f"msg_{job_id.hex}_{status}"


def _insert_ignoring_duplicates(session: Session, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - tierq runs on Postgres or SQLite
        raise RuntimeError(f"unsupported database {dialect}")
    session.execute(insert(WebhookDelivery).values(values).on_conflict_do_nothing())


def record_delivery(session: Session, job_id: uuid.UUID | str) -> str | None:
    """In the caller's transaction: if the job has just ended or been parked and has a
    webhook URL (its own, or its key's default), add the outbox row for this event.
    Returns the event id, or None. A repeated call for the same event adds nothing."""
    job_id = uuid.UUID(str(job_id))
    # no_autoflush: the caller may hold unflushed rows (the answer turn); they are flushed
    # at commit as before, so a constraint violation still surfaces where it always did.
    with session.no_autoflush:
        # A narrow read first: most jobs have no webhook, and their big columns stay put.
        target = session.execute(
            select(Job.status, func.coalesce(Job.webhook_url, ApiKey.default_webhook_url))
            .join(ApiKey, ApiKey.id == Job.owner_id)
            .where(Job.id == job_id)
        ).one_or_none()
        if target is None or target[0] not in ANNOUNCED or not target[1]:
            return None
        url = target[1]
        table = Job.__table__
        row = session.execute(select(table).where(table.c.id == job_id)).one()
        message_id = event_id(job_id, row.status, row.deliveries)
        body = {
            "type": f"job.{row.status}",
            "timestamp": to_jsonable_python(row.updated_at),
            "data": job_view(row),
        }
        _insert_ignoring_duplicates(
            session,
            {
                "id": message_id,
                "job_id": job_id,
                "owner_id": row.owner_id,
                "event_type": body["type"],
                "url": url,
                "payload": json.dumps(body, separators=(",", ":"), ensure_ascii=False),
                "status": DeliveryStatus.PENDING,
                "attempts": 0,
                "next_attempt_at": db_now(),
                "expires_at": db_now(webhook_settings().max_age),
                "attempt_log": [],
            },
        )
    return message_id


def redeliver(
    session: Session, owner_id: uuid.UUID, job_id: uuid.UUID, delivery_id: str
) -> WebhookDelivery | str | None:
    """Send a delivery again, now, with the same ``webhook-id`` (receivers may drop it as a
    repeat, as the specification intends). Returns the row; "sending" if an attempt is in
    flight; None if there is no such delivery for this key and job."""
    owned = (
        WebhookDelivery.id == delivery_id,
        WebhookDelivery.job_id == job_id,
        WebhookDelivery.owner_id == owner_id,
    )
    updated = session.scalar(
        update(WebhookDelivery)
        .where(*owned, WebhookDelivery.status != DeliveryStatus.SENDING)
        .values(
            status=DeliveryStatus.PENDING,
            next_attempt_at=db_now(),
            expires_at=db_now(webhook_settings().max_age),
            published_at=None,
            updated_at=db_now(),
        )
        .returning(WebhookDelivery.id)
    )
    if updated is None:
        status = session.scalar(select(WebhookDelivery.status).where(*owned))
        return status  # None (not found) or "sending"
    return session.scalar(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == updated)
        .execution_options(populate_existing=True)
    )
