"""The minimal tier: answers without a model, for when every model tier is gone.

In order: the latest good answer to the same normalized request within a maximum age
(quality ``cached``), the rules responder named in the configuration (``rules``), the
static message (``static``). None of them may apply; then the job is parked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from tierq.config import MinimalConfig, load_callable
from tierq.db import db_now
from tierq.models import Backend, Job, JobStatus

log = logging.getLogger(__name__)
CACHEABLE_QUALITY = ("full", "reduced")


@dataclass(frozen=True)
class MinimalAnswer:
    content: str
    quality: str  # cached, rules or static
    source: str  # what answered: the cached job's id, the rules callable, "static"


# Request fields that do not change what the answer is.
NOT_THE_QUESTION = frozenset({"messages", "stream", "stream_options", "user", "metadata", "store"})


def cache_key(request: dict[str, Any]) -> str:
    """The same question asked the same way: the whole messages with their text
    whitespace-normalized (case kept: "No" and "no" may matter), model and parameters
    (tools and response format among them)."""
    normalized = {
        "messages": [_normalized(m) for m in request["messages"]],
        "params": {k: v for k, v in request.items() if k not in NOT_THE_QUESTION},
    }
    return hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()


def _normalized(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": " ".join(content.split())}
    return message


@lru_cache
def _rules(path: str) -> Callable[[dict[str, Any]], str | None]:
    return load_callable(path)  # type: ignore[return-value]


def _cached(
    session: Session, key: str, max_age: float, owner_id: uuid.UUID
) -> MinimalAnswer | None:
    # Only the same key's own answers: another tenant's answer may hold its private data.
    row = session.execute(
        select(Job.id, Job.result)
        .where(
            Job.cache_key == key,
            Job.owner_id == owner_id,
            Job.status == JobStatus.SUCCEEDED,
            Job.quality.in_(CACHEABLE_QUALITY),
            Job.finished_at >= db_now(-max_age),
            # A backend retired now (disable --now) must not keep answering from the cache.
            ~exists().where(Backend.name == Job.backend, Backend.retired.is_(True)),
        )
        .order_by(Job.finished_at.desc())
        .limit(1)
    ).first()
    if row is None or not row.result:
        return None
    message = row.result["choices"][0]["message"]
    if message.get("tool_calls"):
        return None  # a tool call made then is no answer to give from a cache now
    return MinimalAnswer(message.get("content") or "", "cached", str(row.id))


def answer(
    session: Session, config: MinimalConfig, request: dict[str, Any], owner_id: uuid.UUID
) -> MinimalAnswer | None:
    """The minimal tier's answer to ``owner_id``'s request, or None."""
    if config.cache_max_age > 0 and (
        hit := _cached(session, cache_key(request), config.cache_max_age, owner_id)
    ):
        return hit
    if config.rules:
        try:
            content = _rules(config.rules)(request)
        except Exception:  # a broken rule must not lose the job: fall through to static
            log.exception("rules responder %s failed", config.rules)
            content = None
        if content:
            return MinimalAnswer(content, "rules", config.rules)
    if config.static_message:
        return MinimalAnswer(config.static_message, "static", "static")
    return None
