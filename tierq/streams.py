"""Token streams from a worker to the API, through a Redis stream per job.

The worker appends each delta (text, tool-call pieces: an OpenAI chunk's delta) as the
backend produces it; the API reads from where it
left off and forwards them as SSE. The stream is transport only: the answer itself is
persisted like any other, and a stream that is lost (Redis restart) costs the live view,
not the answer. A ``reset`` entry tells readers that an attempt failed after it had
streamed text, so what they have shown is void.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis

from tierq.settings import get_settings

RETENTION_SECONDS = 3600
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class Entry:
    id: str
    kind: str  # delta, reset or end
    delta: dict[str, Any]  # a delta entry's OpenAI delta; {} for the others


def _key(job_id: uuid.UUID | str) -> str:
    return f"tierq:stream:{job_id}"


@lru_cache
def _client() -> redis.Redis | None:
    url = get_settings().stream_url or get_settings().effective_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None  # the zero-install broker has no streams: callers fall back to waiting
    return redis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=3, decode_responses=True
    )


def available() -> bool:
    return _client() is not None


def append(job_id: uuid.UUID | str, kind: str, delta: dict[str, Any] | None = None) -> None:
    """Best effort: a Redis hiccup must never fail the job whose tokens these are."""
    client = _client()
    if client is None:
        return
    with suppress(redis.RedisError):
        pipe = client.pipeline(transaction=False)
        fields = {"kind": kind, "delta": json.dumps(delta or {})}
        pipe.xadd(_key(job_id), fields, maxlen=MAX_ENTRIES, approximate=True)
        pipe.expire(_key(job_id), RETENTION_SECONDS)
        pipe.execute()


def read(job_id: uuid.UUID | str, after: str, block_ms: int | None) -> Iterator[Entry]:
    """Entries after ``after``; waits up to ``block_ms`` for one (None: does not wait)."""
    client = _client()
    if client is None:
        return
    found = client.xread({_key(job_id): after}, block=block_ms, count=500)
    for _key_name, entries in found or []:
        for entry_id, fields in entries:
            yield Entry(entry_id, fields["kind"], json.loads(fields.get("delta") or "{}"))


START = "0-0"  # before every entry
SCAN_BATCH = 500


def after_last_reset(job_id: uuid.UUID | str) -> str:
    """Where a new reader starts: after the latest ``reset``, since every delta before it
    belongs to an attempt that failed (START if there is none)."""
    client = _client()
    if client is None:
        return START
    newest = "+"
    while True:
        entries = client.xrevrange(_key(job_id), max=newest, min="-", count=SCAN_BATCH)
        for entry_id, fields in entries:
            if fields.get("kind") == "reset":
                return entry_id
        if len(entries) < SCAN_BATCH:
            return START
        newest = f"({entries[-1][0]}"  # exclusive: continue below the oldest one seen
