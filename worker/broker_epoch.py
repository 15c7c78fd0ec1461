"""Noticing a broker that lost its messages (a Redis restart or flush, a wiped folder).

The relay leaves a marker in the broker's own storage. If the marker is gone, everything
that was queued there is gone too, and every queued job is published again at once instead
of after ``republish_after``.
"""

from __future__ import annotations

import logging
import uuid

import redis

from tierq.settings import Settings

log = logging.getLogger(__name__)
MARKER = "tierq:relay:epoch"


class BrokerEpoch:
    def __init__(self, settings: Settings) -> None:
        url = settings.effective_broker_url
        self._redis = (
            redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
            if url.startswith(("redis://", "rediss://"))
            else None
        )
        self._file = (
            settings.broker_folder / "queue" / ".tierq-epoch"
            if url.startswith(("atomicfs", "filesystem"))
            else None
        )
        self._seen = False

    def lost(self) -> bool:
        """True when the marker is missing: on the first sweep too (we cannot know better)."""
        try:
            if self._redis is not None:
                present = bool(self._redis.exists(MARKER))
            elif self._file is not None:
                present = self._file.exists()
            else:
                return False  # RabbitMQ: durable queues survive a restart
        except redis.RedisError:
            return False  # unreachable is not empty; the relay's publishes will tell
        lost = not present
        if lost and self._seen:
            log.warning("broker marker vanished: the broker lost its queues")
        return lost

    def mark(self) -> None:
        try:
            if self._redis is not None:
                self._redis.set(MARKER, uuid.uuid4().hex)
            elif self._file is not None:
                self._file.parent.mkdir(parents=True, exist_ok=True)
                self._file.write_text(uuid.uuid4().hex)
            self._seen = True
        except (redis.RedisError, OSError):
            pass
