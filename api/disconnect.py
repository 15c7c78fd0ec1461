"""A chat client that goes away before its answer: its job is kept (the default: the answer
is stored and can be fetched), or cancelled when the request asks for it with the header
``x-tierq-cancel-on-disconnect: true`` or its key's default says so. Cancelling aborts the
backend call within a second (``tierq.transitions.cancel``; the worker's lease keeper)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.auth import Caller
from tierq import transitions
from tierq.db import session_scope

HEADER = "x-tierq-cancel-on-disconnect"
REASON = "cancelled: the client disconnected"
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer was sent."""


def wanted(request: Request, caller: Caller) -> bool:
    """The request's header decides; without one, the key's default."""
    value = request.headers.get(HEADER)
    if value is None:
        return caller.cancel_on_disconnect
    return value.strip().lower() in ("true", "1", "yes")


def _cancel(job_id: uuid.UUID, caller: Caller) -> None:
    with session_scope() as session:
        transitions.cancel(session, job_id, caller.key_id, REASON)


async def cancel_job(job_id: uuid.UUID, caller: Caller) -> None:
    # Shielded: this runs as the request's task is being torn down.
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(_cancel, job_id, caller)


async def _gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read already: the next ASGI
    message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, waiting: Awaitable[T]) -> T:
    """``waiting``'s result, or ClientGone as soon as the client disconnects."""
    task = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone


async def watched(
    frames: AsyncIterator[bytes], job_id: uuid.UUID, caller: Caller, cancel: bool
) -> AsyncIterator[bytes]:
    """A streamed answer that ends quietly when the client has gone (ClientGone, or the
    stream closed before its end), and then cancels the job if ``cancel``."""
    ended = False
    try:
        async for frame in frames:
            yield frame
        ended = True
    except ClientGone:
        pass
    finally:
        if cancel and not ended:
            await cancel_job(job_id, caller)
