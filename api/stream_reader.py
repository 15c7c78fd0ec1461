"""Live token streams, read for every streaming request of an API process by one reader.

A streaming chat request follows its job's Redis stream (``tierq.streams``). A blocking
XREAD per request held a thread of the pool for a second at a time, so a few hundred
streams starved every other request. Here one task per process runs one XREAD over every
followed stream and hands each follower the entries after its own position: an idle
stream holds no thread, no connection and no query.

A follower that joins while that XREAD blocks nudges it through a control stream of the
reader's own (read from its last id, so a nudge that arrives before the XREAD is seen
too): its first tokens are not held back until the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from tierq import streams
from tierq.settings import get_settings

log = logging.getLogger(__name__)
BLOCK_MS = 5000  # an XREAD's longest wait: nudges end it sooner, so it costs no latency
COUNT = 500  # entries per stream per XREAD
# After entries arrive, what arrives next is gathered this long before the next XREAD: an
# XREAD names every followed stream, so one per token of each of hundreds of busy streams
# would cost more than the tokens. Adds at most this much to a token's way to its client.
GATHER_SECONDS = 0.01
CONTROL_TTL = 3600  # a dead process's control stream goes away after this many seconds
RETRY_SECONDS = 1.0


def _order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _entry(entry_id: str, fields: dict[str, str]) -> streams.Entry:
    return streams.Entry(entry_id, fields["kind"], json.loads(fields.get("delta") or "{}"))


def _stream_key(job_id: uuid.UUID | str) -> str:
    return streams._key(job_id)  # the one naming rule, shared with the workers' writes


def _url() -> str:
    settings = get_settings()
    return settings.stream_url or settings.effective_broker_url  # as tierq.streams


@dataclass(eq=False)
class Follow:
    """One request's position in its job's stream, and what arrived after it."""

    key: str
    after: str
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    entries: list[streams.Entry] = field(default_factory=list)

    def take(self) -> list[streams.Entry]:
        self.arrived.clear()
        taken, self.entries = self.entries, []
        return taken

    def offer(self, entries: Iterable[streams.Entry]) -> None:
        fresh = [e for e in entries if _order(e.id) > _order(self.after)]
        if fresh:
            self.entries.extend(fresh)
            self.after = fresh[-1].id
            self.arrived.set()


def cursors(follows: dict[str, set[Follow]], control: tuple[str, str]) -> dict[str, str]:
    """What one XREAD asks: each stream from its furthest-behind follower, and the control
    stream from its last id."""
    wanted = {key: min((f.after for f in group), key=_order) for key, group in follows.items()}
    return {control[0]: control[1], **wanted}


class StreamReader:
    def __init__(self, url: str | None = None) -> None:
        self._redis = aioredis.Redis.from_url(
            url or _url(),
            decode_responses=True,
            socket_connect_timeout=3,
            socket_timeout=BLOCK_MS / 1000 + 5,
        )
        self._follows: dict[str, set[Follow]] = {}
        self._control = f"tierq:reader:{uuid.uuid4().hex}"
        self._control_after = "0-0"
        self._joined = asyncio.Event()  # a follower arrived while there were none
        self._blocked = False  # an XREAD is out now: a new follower must nudge it
        self._nudging: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # XREADs issued, for tests and benchmarks

    @contextlib.contextmanager
    def follow(self, job_id: uuid.UUID | str, after: str) -> Iterator[Follow]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        follow = Follow(_stream_key(job_id), after)
        self._follows.setdefault(follow.key, set()).add(follow)
        self._joined.set()
        if self._blocked and (self._nudging is None or self._nudging.done()):
            self._nudging = asyncio.ensure_future(self._nudge())
        try:
            yield follow
        finally:
            group = self._follows.get(follow.key, set())
            group.discard(follow)
            if not group:
                self._follows.pop(follow.key, None)

    async def stop(self) -> None:
        for task in (self._task, self._nudging):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._redis.aclose()

    async def _nudge(self) -> None:
        with contextlib.suppress(Exception):  # best effort: the block ends by itself too
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._control, {"n": "1"}, maxlen=16, approximate=True)
                pipe.expire(self._control, CONTROL_TTL)
                await pipe.execute()

    async def _run(self) -> None:
        while True:
            try:
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("stream reader failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)

    async def _read_once(self) -> None:
        if not self._follows:
            self._joined.clear()
            await self._joined.wait()
            return
        asked = cursors(self._follows, (self._control, self._control_after))
        self._blocked = True
        try:
            found: Any = await self._redis.xread(asked, block=BLOCK_MS, count=COUNT)
        finally:
            self._blocked = False
        self.reads += 1
        delivered = False
        for key, entries in found.items() if isinstance(found, dict) else found or []:
            if key == self._control:
                self._control_after = entries[-1][0]
                continue
            parsed = [_entry(entry_id, fields) for entry_id, fields in entries]
            for follow in list(self._follows.get(key, ())):
                follow.offer(parsed)
            delivered = True
        if delivered:
            await asyncio.sleep(GATHER_SECONDS)
