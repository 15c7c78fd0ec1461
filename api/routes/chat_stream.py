"""``stream: true`` on /v1/chat/completions: the job's tokens as chat.completion.chunk
Server-Sent Events, as the worker produces them (worker → Redis stream → here).

The answer is persisted like any other; the stream is only the live view of it. When no
live view is possible (the zero-install broker has no streams, or the job was answered
without streaming: a replay, the minimal tier, a retry after the job ended) the whole
answer arrives as one chunk. An attempt that fails after it streamed text ends the stream
with an error naming the job: retrying with the same Idempotency-Key returns the job's
answer (the next attempt's tokens, or the whole answer once the job has ended). Where the
answer came from (tier, backend, model, quality, attempts) rides on the chunk that carries
``finish_reason``, under ``tierq.served_by``: response headers go out before it is known.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.auth import Caller
from api.disconnect import ClientGone, wanted, watched
from api.routes.jobs import load_job, wait_for_end
from api.schemas import ServedBy
from api.waiters import first_of
from tierq import streams
from tierq.models import Job, JobStatus

# An SSE comment this often while nothing else is sent: proxies and load balancers close
# connections idle for 30-60 s, and clients' read timeouts restart on every byte.
KEEPALIVE_SECONDS = 5.0
KEEPALIVE = b": keepalive\n\n"


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


class ChunkWriter:
    def __init__(self, job: Job, include_usage: bool) -> None:
        self.id, self.created = f"chatcmpl-{job.id.hex}", int(time.time())
        self.model = job.request.get("model", "tierq")
        self.include_usage = include_usage
        self.started = False

    def chunk(
        self,
        delta: dict[str, Any],
        finish: str | None = None,
        usage: dict[str, Any] | None = None,
        tierq: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = logprobs
        choices = [] if usage else [choice]
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage:
            body["usage"] = usage
        if tierq:
            body["tierq"] = tierq  # the OpenAI SDK keeps unknown fields (chunk.tierq)
        return _sse(body)

    def delta(self, delta: dict[str, Any]) -> bytes:
        """One delta as the backend sent it (text, tool-call pieces); the first has the role.
        The chunk's logprobs travel with its delta (``logprobs``) and go back in the choice."""
        delta = dict(delta)
        logprobs = delta.pop("logprobs", None)
        if not self.started:
            delta = {"role": "assistant", **delta}
        self.started = True
        return self.chunk(delta, logprobs=logprobs)

    def finish(self, job: Job, shown: list[dict[str, Any]]) -> list[bytes]:
        """The end of a succeeded job's stream, after the ``shown`` deltas: what of the
        stored answer they did not carry (all of it if nothing was shown), then
        finish_reason."""
        result = job.result or {}
        choice = (result.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        rest = _unshown(message, shown)
        if choice.get("logprobs") and not any(d.get("logprobs") for d in shown):
            # An answer that was not streamed (or whose stream carried none) has them whole.
            rest = [{**rest[0], "logprobs": choice["logprobs"]}, *rest[1:]] if rest else []
        frames = [self.delta(part) for part in rest]
        if not self.started:
            frames.append(self.delta({"content": ""}))
        tierq = {"job_id": str(job.id), "served_by": ServedBy.of(job).model_dump()}
        frames.append(self.chunk({}, choice.get("finish_reason", "stop"), tierq=tierq))
        if self.include_usage and result.get("usage"):
            frames.append(self.chunk({}, usage=result["usage"]))
        return [*frames, _sse("[DONE]")]


def _unshown(message: dict[str, Any], shown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts of the stored message the client was not shown as deltas. Normally none;
    a delta lost on its way through Redis (or a whole answer never streamed: a replay, the
    minimal tier) is made up here: the rest of the text, and the tool calls whole."""
    rest: list[dict[str, Any]] = []
    text = "".join(d.get("content") or "" for d in shown)
    content = message.get("content") or ""
    if content.startswith(text) and content[len(text) :]:
        rest.append({"content": content[len(text) :]})
    calls = message.get("tool_calls") or []
    if calls and not any(d.get("tool_calls") for d in shown):
        rest.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
    if message.get("refusal") and not any(d.get("refusal") for d in shown):
        rest.append({"refusal": message["refusal"]})
    return rest


def _error(job: Job, message: str, code: str) -> bytes:
    return _sse(
        {
            "error": {
                "message": f"job {job.id}: {message}",
                "type": "server_error",
                "code": code,
                "job_id": str(job.id),
            }
        }
    )


def _not_finished(job: Job) -> bytes:
    return _error(
        job,
        f"no answer yet (it is {job.status}); it was accepted and will run to completion. "
        "Send the same request with the same Idempotency-Key to keep waiting for it, or "
        f"poll GET /v1/jobs/{job.id}",
        "job_not_finished",
    )


def _stream_reset(job: Job) -> bytes:
    return _error(
        job,
        "an attempt failed after it had streamed text; retry with the same "
        "Idempotency-Key for the final answer",
        "stream_reset",
    )


def _settled(job: Job) -> bool:
    """Nothing more will be streamed for this request: the job ended or was parked."""
    return JobStatus(job.status).terminal or job.status == JobStatus.PARKED


def _read(job: Job, after: str, block_ms: int | None) -> list[streams.Entry]:
    return list(streams.read(job.id, after, block_ms))


@dataclass
class LiveView:
    """What one request has read from the job's stream and shown to its client."""

    after: str
    shown: list[dict[str, Any]] = field(default_factory=list)
    reset: bool = False  # an attempt failed after this client was shown its text

    def take(self, entries: list[streams.Entry]) -> list[dict[str, Any]]:
        """The deltas to send now. A reset voids the deltas before it: skipped if none was
        shown yet, an error for the client otherwise."""
        if entries:
            self.after = entries[-1].id
        resets = [i for i, entry in enumerate(entries) if entry.kind == "reset"]
        if resets and self.shown:
            self.reset = True
            return []
        if resets:
            entries = entries[resets[-1] + 1 :]
        deltas = [entry.delta for entry in entries if entry.kind == "delta"]
        self.shown.extend(deltas)
        return deltas


async def _live(
    request: Request, caller: Caller, job: Job, writer: ChunkWriter, wait: float
) -> AsyncIterator[bytes]:
    """The job's deltas as they arrive. Waiting holds nothing: the process's stream reader
    hands this request its entries, the process's waiters say when the job changed
    (``api.waiters``), and only then is the job read again."""
    if _settled(job):  # e.g. a retry with the same Idempotency-Key after the job ended
        for frame in _ending(job, writer, []):
            yield frame
        return
    waiters = request.app.state.waiters
    view = LiveView(await run_in_threadpool(streams.after_last_reset, job.id))
    # What the stream holds already goes out at once; the reader follows from its end.
    for delta in view.take(await run_in_threadpool(_read, job, view.after, None)):
        yield writer.delta(delta)
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + wait
    quiet_since = loop.time()
    with (
        waiters.watch(str(job.id)) as changed,
        waiters.streams.follow(job.id, view.after) as follow,
    ):
        changed.set()  # read the job once now: it may have settled before it was watched
        while not await request.is_disconnected():
            for delta in view.take(follow.take()):
                quiet_since = loop.time()
                yield writer.delta(delta)
            if view.reset:
                yield _stream_reset(job)
                return
            if changed.is_set():
                changed.clear()  # before the read: a change during it is not missed
                job = await run_in_threadpool(load_job, caller, job.id)
                if _settled(job):
                    for frame in await _settled_frames(job, writer, view):
                        yield frame
                    return
            if not view.shown and loop.time() >= give_up_at:
                yield _not_finished(job)
                return
            next_keepalive = quiet_since + KEEPALIVE_SECONDS
            until = min(next_keepalive, give_up_at) if not view.shown else next_keepalive
            woke = await first_of(changed, follow.arrived, timeout=until - loop.time())
            if not woke and loop.time() >= next_keepalive:
                quiet_since = loop.time()
                yield KEEPALIVE
    raise ClientGone  # the loop ends only when the client has disconnected


async def _settled_frames(job: Job, writer: ChunkWriter, view: LiveView) -> list[bytes]:
    """The end of the stream of a job that settled. The worker writes every delta before
    it commits, so what the reader has not handed over yet is in the stream now."""
    rest = await run_in_threadpool(_read, job, view.after, None)
    deltas = view.take(rest)
    if view.reset:
        return [_stream_reset(job)]
    return [writer.delta(delta) for delta in deltas] + _ending(job, writer, view.shown)


def _ending(job: Job, writer: ChunkWriter, shown: list[dict[str, Any]]) -> list[bytes]:
    if job.status == JobStatus.SUCCEEDED:
        return writer.finish(job, shown)
    return [_error(job, f"{job.status}: {job.error or ''}", f"job_{job.status}")]


async def _whole(
    request: Request, caller: Caller, job: Job, writer: ChunkWriter, wait: float
) -> AsyncIterator[bytes]:
    waiting = asyncio.ensure_future(wait_for_end(request, caller, job.id, wait))
    try:
        while not (await asyncio.wait({waiting}, timeout=KEEPALIVE_SECONDS))[0]:
            yield KEEPALIVE
    finally:
        waiting.cancel()  # the client went away: stop waiting for it
    ended = waiting.result()
    if not JobStatus(ended.status).terminal:
        yield _not_finished(ended)
        return
    for frame in _ending(ended, writer, []):
        yield frame


def stream_job(
    request: Request, caller: Caller, job: Job, include_usage: bool, wait: float
) -> AsyncIterator[bytes]:
    """The job's answer as chat.completion.chunk frames; if the client disconnects first,
    its job is cancelled when the request asks for it (``api.disconnect``)."""
    writer = ChunkWriter(job, include_usage)
    if streams.available():
        frames = _live(request, caller, job, writer, wait)
    else:
        frames = _whole(request, caller, job, writer, wait)
    return watched(frames, job.id, caller, cancel=wanted(request, caller))
