"""The in-flight baseline: a stateless async proxy in front of one backend (no durability).

``POST /v1/chat/completions`` is forwarded as it is to ``PROXY_UPSTREAM`` with one shared
httpx.AsyncClient, at most ``PROXY_CAP`` calls at once (an asyncio semaphore; 0: no cap),
which is what a backend's ``max_concurrency`` asks of tierq. No database, no broker, no
auth: what keeping N calls in flight costs at the least. Started by bench/inflight.py:

    PROXY_UPSTREAM=http://127.0.0.1:PORT PROXY_CAP=64 \\
        .venv/bin/python -m uvicorn bench.proxy_app:app --port 8100
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request, Response

UPSTREAM = os.environ["PROXY_UPSTREAM"].rstrip("/")
CAP = int(os.environ.get("PROXY_CAP", "0"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=CAP or 256)
    async with httpx.AsyncClient(base_url=UPSTREAM, timeout=120, limits=limits) as client:
        app.state.client = client
        app.state.slots = asyncio.Semaphore(CAP) if CAP else None
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    client: httpx.AsyncClient = request.app.state.client
    slots: asyncio.Semaphore | None = request.app.state.slots
    if slots is None:
        upstream = await _forward(client, body)
    else:
        async with slots:
            upstream = await _forward(client, body)
    return Response(
        upstream.content,
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type"),
    )


async def _forward(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
