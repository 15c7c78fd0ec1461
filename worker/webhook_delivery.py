"""Webhook delivery: the Celery task on the ``webhooks`` queue, and the relay's part.

Deliveries run on their own queue and workers (``tierq worker --tier webhooks``), so a slow
or dead receiver never holds up a job. The database is the truth here too:
- the relay publishes pending deliveries that are due (``publish_due_deliveries``), and
  returns deliveries whose worker died mid-attempt (expired lease) to pending;
- a worker claims a delivery (pending → sending, with a lease) before it posts, so a
  message delivered twice posts once;
- the outcome is written under that lease: delivered on 2xx; otherwise the attempt is
  logged and the next one scheduled with exponential backoff on the database clock, until
  the delivery's ``expires_at`` (``TIERQ_WEBHOOK_MAX_AGE``) has passed: then failed.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from celery import Task
from sqlalchemy import select, update

from tierq import broker
from tierq.db import db_now, session_scope
from tierq.models import ApiKey, WebhookDelivery
from tierq.settings import get_settings
from tierq.webhook_urls import UnsafeWebhookURL, pin
from tierq.webhooks import (
    DELIVER,
    QUEUE,
    DeliveryStatus,
    WebhookSettings,
    backoff,
    sign_headers,
    webhook_settings,
)
from worker import outbox

log = logging.getLogger(__name__)
app = broker.get_celery()
# A malformed TIERQ_WEBHOOK_* variable stops the worker and relay at start, not each job's
# end (the outbox row is written in the job's own transaction).
webhook_settings()
LOG_KEEP = 50  # attempts kept in a delivery's log (the count is kept in full)
ERROR_CHARS = 300


@dataclass(frozen=True)
class Claimed:
    id: str
    token: uuid.UUID
    url: str
    payload: str
    secret: str | None


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: float


# -- the relay's part ------------------------------------------------------------------


def publish_due_deliveries(settings: WebhookSettings | None = None) -> int:
    """One relay step: reclaim expired sending leases, then publish what is due.

    Never raises: webhooks must not stall the relay's work on jobs; what fails here is
    retried on the next sweep.
    """
    try:
        return _publish_due(settings or webhook_settings())
    except Exception as exc:
        log.warning("webhook relay step failed (%s: %s)", type(exc).__name__, exc)
        return 0


def _publish_due(settings: WebhookSettings) -> int:
    with session_scope() as session:
        reclaimed = session.scalars(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.status == DeliveryStatus.SENDING,
                WebhookDelivery.lease_expires_at < db_now(),
            )
            .values(
                status=DeliveryStatus.PENDING,
                lease_token=None,
                lease_expires_at=None,
                next_attempt_at=db_now(),
                published_at=None,
                last_error="the delivery worker stopped during an attempt",
                updated_at=db_now(),
            )
            .returning(WebhookDelivery.id)
        ).all()
    return len(reclaimed) + outbox.publish_pending(_outbox(settings), get_settings())


_DUE = (WebhookDelivery.status == DeliveryStatus.PENDING) & (
    WebhookDelivery.next_attempt_at <= db_now()
)


def _outbox(settings: WebhookSettings) -> outbox.Outbox:
    return outbox.Outbox(
        table=WebhookDelivery,
        task=DELIVER,
        kind="webhook",
        waiting=lambda: _DUE,
        order=lambda: [WebhookDelivery.next_attempt_at],
        republish_after=lambda: settings.republish_after,
        queue_name=QUEUE,
    )


# -- the worker's part -----------------------------------------------------------------


def claim(delivery_id: str, settings: WebhookSettings) -> Claimed | None:
    """pending → sending, if due. None: a duplicate or stale message (already claimed,
    delivered, failed, or rescheduled since it was published)."""
    token = uuid.uuid4()
    with session_scope() as session:
        row = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at <= db_now(),
            )
            .values(
                status=DeliveryStatus.SENDING,
                lease_token=token,
                lease_expires_at=db_now(settings.lease_seconds),
                updated_at=db_now(),
            )
            .returning(WebhookDelivery.url, WebhookDelivery.payload, WebhookDelivery.owner_id)
        ).one_or_none()
        if row is None:
            return None
        secret = session.scalar(select(ApiKey.webhook_secret).where(ApiKey.id == row.owner_id))
    return Claimed(delivery_id, token, row.url, row.payload, secret)


def attempt(claimed: Claimed, settings: WebhookSettings) -> Outcome:
    """One POST. Never raises: every failure is an outcome to log and retry."""
    started = time.monotonic()

    def outcome(ok: bool, code: int | None, error: str | None) -> Outcome:
        return Outcome(ok, code, error, round((time.monotonic() - started) * 1000, 1))

    if not claimed.secret:
        return outcome(False, None, "the API key has no webhook secret (created before webhooks)")
    try:
        target = pin(claimed.url, settings)
    except UnsafeWebhookURL as exc:
        return outcome(False, None, f"refused: {exc}")
    except (OSError, UnicodeError) as exc:
        return outcome(False, None, f"could not resolve the host: {exc}")
    headers = {
        **sign_headers(claimed.secret, claimed.id, claimed.payload, int(time.time())),
        **target.headers,
    }
    try:
        # trust_env=False: no proxy from the environment, so the checked address is the
        # one connected to; no redirects, which could point anywhere.
        with httpx.Client(
            timeout=settings.timeout, follow_redirects=False, trust_env=False
        ) as client:
            request = client.build_request(
                "POST",
                target.url,
                content=claimed.payload.encode(),
                headers=headers,
                extensions=target.extensions,
            )
            response = client.send(request, stream=True)
            try:
                code = response.status_code
                if 200 <= code < 300:
                    return outcome(True, code, None)
                snippet = _read_some(response)
            finally:
                response.close()
    except Exception as exc:  # connection, TLS, timeout, protocol: all one failed attempt
        return outcome(False, None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
    detail = f"HTTP {code}" + (f": {snippet}" if snippet else "")
    return outcome(False, code, detail[:ERROR_CHARS])


def _read_some(response: httpx.Response, limit: int = ERROR_CHARS) -> str:
    """The start of an error body, for the log; never the whole of a large one."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= limit:
                break
    except httpx.HTTPError:
        pass
    return data[:limit].decode(errors="replace").strip()


def finish(claimed: Claimed, outcome: Outcome, settings: WebhookSettings) -> str | None:
    """Write the outcome, if this worker still holds the lease. Returns the new status."""
    mine = (
        WebhookDelivery.id == claimed.id,
        WebhookDelivery.lease_token == claimed.token,
        WebhookDelivery.status == DeliveryStatus.SENDING,
    )
    with session_scope() as session:
        row = session.execute(
            select(
                WebhookDelivery.attempts,
                WebhookDelivery.attempt_log,
                (WebhookDelivery.expires_at <= db_now()).label("expired"),
                db_now().label("now"),
            ).where(*mine)
        ).one_or_none()
        if row is None:
            log.warning("webhook %s: lease lost before the outcome was saved", claimed.id)
            return None
        attempts = row.attempts + 1
        entry = {
            "attempt": attempts,
            "at": row.now.isoformat().replace("+00:00", "Z"),
            "status_code": outcome.status_code,
            "error": outcome.error,
            "duration_ms": outcome.duration_ms,
        }
        values: dict[str, Any] = {
            "attempts": attempts,
            "attempt_log": [*(row.attempt_log or []), entry][-LOG_KEEP:],
            "last_status_code": outcome.status_code,
            "last_error": outcome.error,
            "lease_token": None,
            "lease_expires_at": None,
            "updated_at": db_now(),
        }
        if outcome.ok:
            status = DeliveryStatus.DELIVERED
            values.update(next_attempt_at=None, delivered_at=db_now())
        elif row.expired:
            status = DeliveryStatus.FAILED
            values.update(next_attempt_at=None)
        else:
            status = DeliveryStatus.PENDING
            values.update(next_attempt_at=db_now(backoff(attempts, settings)), published_at=None)
        session.execute(update(WebhookDelivery).where(*mine).values(status=status, **values))
    if status == DeliveryStatus.FAILED:
        log.warning("webhook %s failed after %d attempts: %s", claimed.id, attempts, outcome.error)
    return status


def deliver(delivery_id: str, settings: WebhookSettings | None = None) -> str | None:
    settings = settings or webhook_settings()
    claimed = claim(delivery_id, settings)
    if claimed is None:
        log.debug("webhook %s: not due or already taken; dropping the message", delivery_id)
        return None
    outcome = attempt(claimed, settings)
    status = finish(claimed, outcome, settings)
    log.info(
        "webhook %s: attempt %s, %s",
        delivery_id,
        "ok" if outcome.ok else (outcome.error or outcome.status_code),
        status,
    )
    return status


@app.task(name=DELIVER, bind=True, acks_late=True, ignore_result=True)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    try:
        deliver(str(delivery_id))
    except Exception:  # database down: the lease expires and the relay publishes it again
        log.exception("webhook %s: delivery attempt could not be recorded", delivery_id)
