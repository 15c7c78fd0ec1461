"""The few ASGI primitives the simulator needs, kept raw for low per-request overhead."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
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


async def reset_connection(send: Send, watch: Watch) -> None:
    """Close the client's TCP connection with a RST and no HTTP response.

    ASGI has no way to say "drop this connection", so this reaches the transport through
    the server's ``send`` callable (uvicorn's per-request cycle object keeps it as
    ``transport``). SO_LINGER with a zero timeout makes close() send RST instead of FIN,
    which is what a crashed server or a dropped NAT entry looks like to the client.
    """
    transport = _transport(send)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    watch.dropping = True
    transport.abort()
    # Return only once the server has seen the connection go, or it would try a 500: the
    # watch cancels this wait when the disconnect arrives.
    await forever()


async def drop_connection(send: Send, watch: Watch) -> None:
    """Close the client's connection in the middle of a chunked body: what sent is
    delivered, then FIN without the body's last chunk (a server giving up on a stream)."""
    watch.dropping = True
    _transport(send).close()
    await forever()  # until the watch sees the connection go


def _transport(send: Send) -> Any:
    # ASGI has no way to say "drop this connection"; uvicorn's per-request cycle object,
    # whose method `send` is, keeps the connection's transport.
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("dropping a connection needs uvicorn (no transport behind `send`)")
    return transport


class Watch:
    """The connection of one request, watched while it is answered.

    A real server (vLLM, Ollama) stops generating when its client goes away; so does the
    simulator: ``run`` cancels the answer as soon as ``receive()`` says ``http.disconnect``.
    The request body must have been read already: from then on only the watch reads
    ``receive()``.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.dropping = False  # the simulator drops the connection itself (the reset fault)

    async def run(self, answer: Coroutine[Any, Any, None]) -> bool:
        """Answer; True if the client went away before the answer was complete."""
        answering = asyncio.ensure_future(answer)
        watching = asyncio.ensure_future(wait_disconnect(self._receive))
        try:
            await asyncio.wait((answering, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watching.done() and not watching.cancelled():
                watching.exception()  # a failed receive() ends the watch, nothing more
            watching.cancel()
            # uvicorn's receive() also says http.disconnect once the response is complete,
            # so an answer that is done has won over a disconnect seen at the same time.
            gone = not answering.done()
            if gone:
                answering.cancel()
                await asyncio.wait((answering,))
        if gone:
            return not self.dropping
        answering.result()  # an answer that failed fails the request, as it would unwatched
        return False


async def forever() -> None:
    """Wait until cancelled: the hang fault, which a Watch ends when the client gives up."""
    await asyncio.get_running_loop().create_future()
