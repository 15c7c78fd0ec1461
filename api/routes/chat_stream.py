"""``stream: true`` on /v1/chat/completions: the job's tokens as chat.completion.chunk
Server-Sent Events, as the worker produces them (worker → Redis stream → here).

The answer is persisted like any other; the stream is only the live view of it. When no
live view is possible (the zero-install broker has no streams, or the job was answered
without streaming: a replay, the minimal tier) the whole answer arrives as one chunk. An
attempt that fails after it streamed text ends the stream with an error naming the job:
retrying with the same Idempotency-Key returns the job's final answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.auth import Caller
from api.routes.jobs import load_job, wait_for_end
from tierq import streams
from tierq.models import Job, JobStatus

BLOCK_MS = 1000


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
        self, delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None
    ) -> bytes:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage:
            body["usage"] = usage
        return _sse(body)

    def text(self, text: str) -> bytes:
        delta = {"content": text} if self.started else {"role": "assistant", "content": text}
        self.started = True
        return self.chunk(delta)

    def finish(self, job: Job, streamed: bool) -> list[bytes]:
        result = job.result or {}
        choice = (result.get("choices") or [{}])[0]
        frames = [] if streamed else [self.text(choice.get("message", {}).get("content", ""))]
        frames.append(self.chunk({}, choice.get("finish_reason", "stop")))
        if self.include_usage and result.get("usage"):
            frames.append(self.chunk({}, usage=result["usage"]))
        return [*frames, _sse("[DONE]")]


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


def _read(job: Job, after: str) -> list[streams.Entry]:
    return list(streams.read(job.id, after, BLOCK_MS))


async def _live(
    request: Request, caller: Caller, job: Job, writer: ChunkWriter
) -> AsyncIterator[bytes]:
    after, streamed = "0-0", False
    while not await request.is_disconnected():
        entries = await run_in_threadpool(_read, job, after)
        for entry in entries:
            after = entry.id
            if entry.kind == "delta":
                streamed = True
                yield writer.text(entry.text)
            elif entry.kind == "reset" and streamed:
                yield _error(
                    job,
                    "an attempt failed after it had streamed text; retry with "
                    "the same Idempotency-Key for the final answer",
                    "stream_reset",
                )
                return
        current = await run_in_threadpool(load_job, caller, job.id)
        if JobStatus(current.status).terminal or current.status == JobStatus.PARKED:
            for frame in _ending(current, writer, streamed):
                yield frame
            return


def _ending(job: Job, writer: ChunkWriter, streamed: bool) -> list[bytes]:
    if job.status == JobStatus.SUCCEEDED:
        return writer.finish(job, streamed)
    return [_error(job, f"{job.status}: {job.error or ''}", f"job_{job.status}")]


async def _whole(
    request: Request, caller: Caller, job: Job, writer: ChunkWriter, wait: float
) -> AsyncIterator[bytes]:
    ended = await wait_for_end(request, caller, job.id, wait)
    if not JobStatus(ended.status).terminal:
        yield _error(
            ended,
            "not finished yet; retry with the same Idempotency-Key or poll "
            f"GET /v1/jobs/{ended.id}",
            "job_not_finished",
        )
        return
    for frame in _ending(ended, writer, streamed=False):
        yield frame


def stream_job(
    request: Request, caller: Caller, job: Job, include_usage: bool, wait: float
) -> AsyncIterator[bytes]:
    writer = ChunkWriter(job, include_usage)
    if streams.available():
        return _live(request, caller, job, writer)
    return _whole(request, caller, job, writer, wait)
