"""API keys: shown once at creation, stored only as a SHA-256 hash.

Each key also gets a webhook signing secret, shown once with it. That one is stored as it
is (it must be at hand to sign every delivery); it is never logged nor shown again.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from tierq.models import ApiKey
from tierq.webhook_urls import check_url
from tierq.webhooks import new_secret

KEY_PREFIX = "tq_"


def hash_key(key: str) -> str:
    # Keys are 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedKey:
    id: str
    name: str
    key: str  # the only time the plain key exists
    webhook_secret: str = ""  # signs this key's webhooks; shown only now
    default_webhook_url: str | None = None


def create_key(
    session: Session,
    name: str,
    *,
    is_admin: bool = False,
    webhook_url: str | None = None,
    cancel_on_disconnect: bool = False,
    rps: float | None = None,
    max_jobs: int | None = None,
    max_waiters: int | None = None,
) -> CreatedKey:
    """``webhook_url``: where this key's jobs are announced when they name no URL of their
    own; checked like a job's (raises tierq.webhook_urls.UnsafeWebhookURL, a ValueError).
    ``rps``, ``max_jobs``, ``max_waiters``: the key's own limits (api/key_limits.py); None
    keeps the defaults from settings, 0 means none; negative raises ValueError."""
    if webhook_url is not None:
        check_url(webhook_url)
    for name_, limit in (("rps", rps), ("max_jobs", max_jobs), ("max_waiters", max_waiters)):
        if limit is not None and limit < 0:
            raise ValueError(f"{name_} must be 0 (no limit) or more")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    secret = new_secret()
    row = ApiKey(
        name=name,
        prefix=key[:10],
        key_hash=hash_key(key),
        is_admin=is_admin,
        webhook_secret=secret,
        default_webhook_url=webhook_url,
        cancel_on_disconnect=cancel_on_disconnect,
        rps=rps,
        max_jobs=max_jobs,
        max_waiters=max_waiters,
    )
    session.add(row)
    session.flush()
    return CreatedKey(
        id=str(row.id), name=name, key=key, webhook_secret=secret, default_webhook_url=webhook_url
    )


def find_key(session: Session, key: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row if row is not None and row.revoked_at is None else None
