"""The few ASGI primitives the simulator needs, kept raw for low per-request overhead."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = "application/json"


@dataclass(frozen=True)
class Reply:
    """A complete HTTP response."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = field(default=())


def dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def json_reply(status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, dumps(data), JSON, headers)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def send_reply(send: Send, reply: Reply) -> None:
    headers = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
    ]
    headers += [(k.encode(), v.encode()) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def start_stream(send: Send, content_type: str) -> None:
    """Start a chunked 200 response; the body follows in ``send_chunk`` calls."""
    headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def send_chunk(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def wait_disconnect(receive: Receive) -> None:
    """Block until the client goes away (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def reset_connection(send: Send, receive: Receive) -> None:
    """Close the client's TCP connection with a RST and no HTTP response.

    ASGI has no way to say "drop this connection", so this reaches the transport through
    the server's ``send`` callable (uvicorn's per-request cycle object keeps it as
    ``transport``). SO_LINGER with a zero timeout makes close() send RST instead of FIN,
    which is what a crashed server or a dropped NAT entry looks like to the client.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("the reset fault needs uvicorn (no transport behind `send`)")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    # Return only once the server has seen the connection go, or it would try a 500.
    await wait_disconnect(receive)
