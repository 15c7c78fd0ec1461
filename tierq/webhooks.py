"""Webhooks: what both sides share. The outbox row, the payload, signing, and the guard
against server-side request forgery.

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
import ipaddress
import json
import random
import secrets
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, Field
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


# -- server-side request forgery ---------------------------------------------------------


class UnsafeWebhookURL(ValueError):
    """The URL is malformed, or its host is (or resolves to) a non-public address."""


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not receive webhooks, or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return _non_public(mapped)
    for attribute, reason in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(address, attribute):
            return reason
    if not address.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT), documentation ranges
        return "non-public"
    return None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written (lowercase), without brackets
    port: int
    url: str


def parse_url(url: str) -> Target:
    """Syntax only: http or https, a host, no credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookURL(f"not a valid URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeWebhookURL("must be an http:// or https:// URL")
    if not parts.hostname:
        raise UnsafeWebhookURL("must name a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeWebhookURL("must not contain credentials; receivers verify the signature")
    try:  # an internationalized name in its ASCII form: what DNS and the Host header use
        host = parts.hostname.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise UnsafeWebhookURL("the host is not a valid name") from exc
    default = 443 if scheme == "https" else 80
    return Target(scheme, host, port or default, url)


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def resolve(target: Target) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address the host resolves to (raises OSError when it does not resolve)."""
    literal = _literal(target.host)
    if literal is not None:
        return [literal]
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise OSError(f"{target.host} has no address")
    return found


def refuse_non_public(
    target: Target, addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> None:
    """Refuse if any address is non-public: one bad record is enough to be steered there."""
    for address in addresses:
        reason = _non_public(address)
        if reason is None:
            continue
        if _literal(target.host) is not None:
            raise UnsafeWebhookURL(
                f"{address} is a {reason} address; webhooks are sent only to public addresses"
            )
        raise UnsafeWebhookURL(
            f"{target.host} resolves to {address}, a {reason} address; webhooks are sent "
            "only to public addresses"
        )


@lru_cache
def _resolver_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


def check_syntax(url: str, settings: WebhookSettings | None = None) -> Target:
    """What can be checked without the network: the syntax, and a host that is a literal
    address (unless private targets are allowed). Raises UnsafeWebhookURL."""
    settings = settings or webhook_settings()
    target = parse_url(url)
    literal = _literal(target.host)
    if literal is not None and not settings.allow_private:
        refuse_non_public(target, [literal])
    return target


def check_url(url: str, settings: WebhookSettings | None = None) -> str:
    """Submit-time check of a webhook URL: the syntax, then (unless private targets are
    allowed) every address its host resolves to. Raises UnsafeWebhookURL.

    Blocks for DNS, up to ``resolve_timeout``: call it from a worker thread, never on an
    event loop. A host that does not resolve (yet) is accepted, since the delivery worker
    checks the resolved address again before every request (DNS can change between submit
    and delivery) and sends only to that address.
    """
    settings = settings or webhook_settings()
    target = check_syntax(url, settings)
    if settings.allow_private or _literal(target.host) is not None:
        return url
    future = _resolver_pool().submit(resolve, target)
    try:
        addresses = future.result(timeout=settings.resolve_timeout)
    except (OSError, FutureTimeout, UnicodeError):
        return url
    refuse_non_public(target, addresses)
    return url


def _validate(url: str) -> str:
    # Syntax only: request bodies are validated on the API's event loop, where waiting for
    # DNS would stall every other request. The endpoint resolves the host in a thread.
    try:
        check_syntax(url)
    except UnsafeWebhookURL as exc:
        raise ValueError(str(exc)) from None
    return url


# The request field: a 422 naming `webhook_url` when the URL is malformed or a non-public
# literal address; endpoints then call check_url (off the event loop) for host names.
WebhookURL = Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_validate)]


@dataclass(frozen=True)
class PinnedRequest:
    url: str  # the URL with its host replaced by the checked address
    headers: dict[str, str]  # Host: the original host
    extensions: dict[str, Any]  # TLS server name (SNI and certificate check): the original host


def pin(url: str, settings: WebhookSettings) -> PinnedRequest:
    """Delivery-time check: resolve now, refuse non-public addresses (unless allowed), and
    connect to exactly the address that was checked, so a DNS answer that changes between
    the check and the connection (rebinding) cannot redirect the request."""
    target = parse_url(url)
    addresses = resolve(target)
    if not settings.allow_private:
        refuse_non_public(target, addresses)
    address = addresses[0]
    parts = urlsplit(url)
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{host}:{target.port}"
    pinned = urlunsplit((target.scheme, netloc, parts.path or "/", parts.query, ""))
    default = 443 if target.scheme == "https" else 80
    shown = f"[{target.host}]" if ":" in target.host else target.host
    host_header = shown if target.port == default else f"{shown}:{target.port}"
    extensions: dict[str, Any] = {}
    if target.scheme == "https" and _literal(target.host) is None:
        extensions["sni_hostname"] = target.host
    return PinnedRequest(pinned, {"host": host_header}, extensions)


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
