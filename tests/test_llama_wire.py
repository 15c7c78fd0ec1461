"""What llama-cpp-python 0.3.36's OpenAI-compatible server really puts on the wire.

Raw HTTP against the real server (tests/llama_server.py: the tiny model, n_ctx 512, the
ChatML chat format it guesses from the model's template). Each test pins one fact; the
simulator's llama knobs (``slots``, ``interrupt_streams``, ``overflow_stream``,
``stream_usage``) replicate them and tests/test_simulator.py checks it against the same
facts. A test here that fails means the server changed, not tierq.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.llama_server import (
    ANSWER,
    ANSWER_TOKENS,
    MODEL_NAME,
    N_CTX,
    LlamaServer,
    llama,
    model_path,
    running_llama,
)

__all__ = ["llama"]  # the session fixture, imported for pytest
CHAT = [{"role": "user", "content": "hi"}]
# The model says its answer over and over (its end of turn is forbidden): ~0.3 s of tokens.
LONG = {"min_tokens": 400, "max_tokens": 400}
LONGEST = {"min_tokens": 470, "max_tokens": 470}  # as long as the context allows
ENDED = 0.05  # seconds between the server's answer and a thread noting it had it
TOO_LONG = [{"role": "user", "content": "a " * N_CTX}]  # a token per character
SSE_TYPE = "text/event-stream; charset=utf-8"


def chat(server: LlamaServer, **body: Any) -> httpx.Response:
    body = {"model": "m", "messages": CHAT} | body
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def events(data: bytes) -> list[str]:
    """The data of each server-sent event (the server separates them with a blank line)."""
    assert data.endswith(b"\n\n") or not data
    return [frame.removeprefix(b"data: ").decode() for frame in data.split(b"\n\n") if frame]


def chunks(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(e) for e in events(data) if e != "[DONE]"]


def stream(server: LlamaServer, **body: Any) -> tuple[httpx.Response, bytes]:
    body = {"model": "m", "messages": CHAT, "stream": True} | body
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        return r, r.read()


@pytest.fixture(scope="module")
def formats() -> Iterator[dict[str, LlamaServer]]:
    """Servers with another chat format, started on first use, stopped with the module."""
    servers: dict[str, LlamaServer] = {}

    class Lazy(dict[str, LlamaServer]):
        def __missing__(self, chat_format: str) -> LlamaServer:
            server = LlamaServer(options={"chat_format": chat_format})
            server.start()
            servers[chat_format] = self[chat_format] = server
            return server

    yield Lazy()
    for server in servers.values():
        server.stop()


# -- answers ----------------------------------------------------------------------------
def test_models_lists_the_alias(llama: LlamaServer) -> None:
    models = httpx.get(f"{llama.url}/v1/models").json()
    assert models == {
        "object": "list",
        "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "me", "permissions": []}],
    }


def test_a_plain_answer(llama: LlamaServer) -> None:
    response = chat(llama, model="any-name")
    answer = response.json()
    assert response.headers["content-type"] == "application/json"
    assert list(answer) == ["id", "object", "created", "model", "choices", "usage"]
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert answer["model"] == "any-name"  # whatever the request said, not the alias
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"content": ANSWER, "role": "assistant"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    usage = answer["usage"]
    assert usage["completion_tokens"] == ANSWER_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + ANSWER_TOKENS
    cut = chat(llama, max_tokens=3).json()["choices"][0]
    assert (cut["message"]["content"], cut["finish_reason"]) == (" Hello from the", "length")
    nameless = httpx.post(f"{llama.url}/v1/chat/completions", json={"messages": CHAT}).json()
    assert nameless["model"] == str(model_path())  # no model in the request: the file's path


def test_a_stream_never_carries_usage(llama: LlamaServer) -> None:
    response, data = stream(llama)
    assert response.headers["content-type"] == SSE_TYPE
    assert events(data)[-1] == "[DONE]"
    parsed = chunks(data)
    assert {c["id"] for c in parsed} == {parsed[0]["id"]}
    assert all(list(c) == ["id", "model", "created", "object", "choices"] for c in parsed)
    deltas = [c["choices"][0]["delta"] for c in parsed]
    finishes = [c["choices"][0]["finish_reason"] for c in parsed]
    assert deltas[0] == {"role": "assistant"}  # no content key in the first delta
    assert "".join(d["content"] for d in deltas[1:-1]) == ANSWER
    assert len(deltas) == ANSWER_TOKENS + 2  # one token per chunk
    assert (deltas[-1], finishes[-1]) == ({}, "stop")
    assert finishes[:-1] == [None] * (len(parsed) - 1)
    # stream_options.include_usage is ignored: the same events, no usage anywhere.
    _, asked = stream(llama, stream_options={"include_usage": True})
    assert len(events(asked)) == len(events(data))
    assert all("usage" not in c for c in chunks(asked))


# -- one request at a time, and what a newcomer does to a running stream ----------------
# The checks of these facts take bytes from any server: the simulator's tests reuse them.
def interrupted(url: str, body: dict[str, Any], interrupt: Any) -> tuple[bytes, Any, Any]:
    """POST a stream to ``url``, call ``interrupt()`` once it flows, read the rest: the
    bytes received, the error that ended the reading (None: it ended well), and what
    ``interrupt()`` returned."""
    received: list[bytes] = []
    outcome: dict[str, Any] = {}
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        raw = response.iter_raw()
        received.append(next(raw))
        thread = threading.Thread(target=lambda: outcome.setdefault("other", interrupt()))
        thread.start()
        try:
            received.extend(raw)
        except httpx.HTTPError as exc:
            outcome["error"] = exc
        thread.join()
    return b"".join(received), outcome.get("error"), outcome["other"]


def check_interrupted(data: bytes, error: Any) -> list[dict[str, Any]]:
    """A stream a newcomer ended: its last event is [DONE] and no chunk has a finish_reason.
    Usually the connection then closes without the chunked body's end; under load the server
    sometimes ends the body first (seen in a full suite run), so either is its answer: only
    the missing finish_reason tells a cut stream. Returns the chunks."""
    assert data.endswith(b"data: [DONE]\n\n")
    parsed = chunks(data)
    assert [c["choices"][0]["finish_reason"] for c in parsed] == [None] * len(parsed)
    if error is not None:
        assert isinstance(error, httpx.RemoteProtocolError)
        assert "incomplete chunked read" in str(error)
    return parsed


def test_a_new_request_ends_a_running_stream_with_done_and_a_dropped_connection(
    llama: LlamaServer,
) -> None:
    body = {"model": "m", "messages": CHAT, "stream": True} | LONG
    url = f"{llama.url}/v1/chat/completions"
    data, error, other = interrupted(url, body, lambda: chat(llama, max_tokens=3))
    parsed = check_interrupted(data, error)
    assert len(parsed) < LONG["max_tokens"]  # it stopped early
    assert parsed[-1]["choices"][0]["delta"]["content"]  # after a token, with nothing else
    assert other.status_code == 200  # the newcomer is answered as usual
    assert other.json()["choices"][0]["finish_reason"] == "length"


def test_even_a_models_listing_interrupts_a_stream(llama: LlamaServer) -> None:
    body = {"model": "m", "messages": CHAT, "stream": True} | LONG
    listing = lambda: httpx.get(f"{llama.url}/v1/models")  # noqa: E731
    data, error, models = interrupted(f"{llama.url}/v1/chat/completions", body, listing)
    assert len(check_interrupted(data, error)) < LONG["max_tokens"]
    assert models.status_code == 200


def queued_stream(url: str, long: Any, body: Any, short: Any) -> tuple[bytes, Any, Any]:
    """A long plain answer; a stream waiting behind it; a short answer waiting behind both.
    Returns the stream's bytes, the error that ended its reading, the short answer."""
    generating = threading.Thread(target=lambda: httpx.post(url, json=long, timeout=30))
    generating.start()
    time.sleep(0.05)  # the long answer takes 0.3 s or more: both must queue behind it
    received: list[bytes] = []
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=30) as response:
                received.extend(response.iter_raw())
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.05)
    answer = httpx.post(url, json=short, timeout=30)
    generating.join()
    reader.join()
    return b"".join(received), outcome.get("error"), answer


def test_a_stream_that_waited_is_cut_at_once_by_one_waiting_behind_it(
    llama: LlamaServer,
) -> None:
    data, error, answer = queued_stream(
        f"{llama.url}/v1/chat/completions",
        {"model": "m", "messages": CHAT} | LONGEST,
        {"model": "m", "messages": CHAT, "stream": True},
        {"model": "m", "messages": CHAT, "max_tokens": 1},
    )
    assert len(check_interrupted(data, error)) <= 2  # its first chunk, perhaps one token
    assert answer.status_code == 200


def test_the_openai_sdk_sees_an_interrupted_stream_end_quietly(llama: LlamaServer) -> None:
    client = openai.OpenAI(base_url=f"{llama.url}/v1", api_key="x", max_retries=0)
    received = client.chat.completions.create(
        model="m",
        messages=CHAT,
        stream=True,
        extra_body=LONG,  # type: ignore[arg-type]
    )
    first = next(iter(received))
    assert first.choices[0].delta.role == "assistant"
    chat(llama, max_tokens=1)  # the stream is cut while this waits for the model
    rest = list(received)  # no exception: the SDK stops at [DONE]
    assert 0 < len(rest) < LONG["max_tokens"]
    assert {c.choices[0].finish_reason for c in rest} == {None}


def test_without_interrupt_requests_a_newcomer_waits(llama: LlamaServer) -> None:
    body = {"model": "m", "messages": CHAT, "stream": True} | LONG
    with running_llama(options={"interrupt_requests": False}) as patient:
        url = f"{patient.url}/v1/chat/completions"
        data, error, other = interrupted(url, body, lambda: chat(patient, max_tokens=3))
    assert error is None
    assert chunks(data)[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks(data)) == LONG["max_tokens"] + 2
    assert other.status_code == 200


def in_background(request: Any, ends: dict[str, float], name: str) -> threading.Thread:
    """Run ``request()`` in a thread; ``ends[name]`` is when its answer was complete."""

    def run() -> None:
        request()
        ends[name] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_one_generation_at_a_time(llama: LlamaServer) -> None:
    ends: dict[str, float] = {}
    threads = [in_background(lambda: chat(llama, **LONGEST), ends, "long")]
    time.sleep(0.1)  # the long one is generating (for 0.3 s or more)
    threads.append(in_background(lambda: chat(llama, max_tokens=1), ends, "short"))
    listing = in_background(lambda: httpx.get(f"{llama.url}/v1/models"), ends, "models")
    threads.append(listing)
    for thread in threads:
        thread.join()
    # A one-token answer waits for the long one; so does a models listing (a liveness
    # probe is as slow as the generation in front of it). ENDED: the long answer's thread
    # may note its end a moment after the server let the next one in.
    assert ends["short"] > ends["long"] - ENDED
    assert ends["models"] > ends["long"] - ENDED


def test_a_waiting_stream_gets_its_headers_at_once(llama: LlamaServer) -> None:
    ends: dict[str, float] = {}
    generating = in_background(lambda: chat(llama, **LONGEST), ends, "long")
    time.sleep(0.1)
    body = {"model": "m", "messages": CHAT, "stream": True, "max_tokens": 1}
    with httpx.stream("POST", f"{llama.url}/v1/chat/completions", json=body, timeout=30) as r:
        headers = time.monotonic()
        raw = r.iter_raw()
        next(raw)
        first_event = time.monotonic()
        list(raw)
    generating.join()
    assert r.status_code == 200
    assert headers < ends["long"] - ENDED  # the 200 at once; the first event after the slot
    assert first_event > ends["long"] - ENDED


# -- context overflow -------------------------------------------------------------------
def test_a_prompt_over_the_context_is_a_400(llama: LlamaServer) -> None:
    response = chat(llama, messages=TOO_LONG)
    assert response.status_code == 400
    error = response.json()["error"]
    prompt = int(error["message"].split("(")[1].split(" ")[0])
    assert prompt > N_CTX
    assert error == {
        "message": f"This model's maximum context length is {N_CTX} tokens. However, you "
        f"requested {prompt} tokens ({prompt} in the messages, None in the completion). "
        "Please reduce the length of the messages or completion.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    with_limit = chat(llama, messages=TOO_LONG, max_tokens=10).json()["error"]["message"]
    assert f"requested {prompt + 10} tokens ({prompt} in the messages, 10 in" in with_limit


def test_only_the_prompt_must_fit_max_tokens_is_cut_to_the_context(llama: LlamaServer) -> None:
    fits = [{"role": "user", "content": "a " * (N_CTX // 2 - 30)}]
    answer = chat(llama, messages=fits, max_tokens=N_CTX, min_tokens=N_CTX).json()
    usage = answer["usage"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage["total_tokens"] == N_CTX  # not a 400: generated up to the context's end


def raw_post(port: int, path: str, body: dict[str, Any], close: bool = True) -> bytes:
    """The answer's bytes, read until the server closes the connection (which it is asked
    to do, unless not ``close``: then it must close it of its own accord)."""
    data = json.dumps(body).encode()
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{connection}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + data)
        while chunk := sock.recv(65536):
            raw += chunk
    return raw


def check_empty_stream(raw: bytes) -> None:
    """A 200 event stream whose chunked body ends at once: no event, no error, no [DONE]."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = [line.lower() for line in head.decode().split("\r\n")]
    assert lines[0] == "http/1.1 200 ok"
    assert f"content-type: {SSE_TYPE}" in lines and "transfer-encoding: chunked" in lines
    assert rest == b"0\r\n\r\n"


def test_a_streamed_prompt_over_the_context_is_an_empty_200(llama: LlamaServer) -> None:
    body = {"model": "m", "messages": TOO_LONG, "stream": True}
    # Then it closes the connection, though it said keep-alive (a read to EOF ends).
    check_empty_stream(raw_post(llama.port, "/v1/chat/completions", body, close=False))
    client = openai.OpenAI(base_url=f"{llama.url}/v1", api_key="x", max_retries=0)
    streamed = client.chat.completions.create(model="m", messages=TOO_LONG, stream=True)  # type: ignore[arg-type]
    assert list(streamed) == []  # the SDK sees an answer with nothing in it


# -- tools, JSON mode, content parts: what the chat format makes of them ----------------
TIME = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
NAMED = {"type": "function", "function": {"name": "get_time"}}
ARGUMENTS = '{"zone":""}'  # the tiny model's shortest valid arguments, compact


def tool_round(result: str, content: Any = "") -> list[dict[str, Any]]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    called = {"role": "assistant", "content": content, "tool_calls": [call]}
    if content is ...:
        del called["content"]
    return [*CHAT, called, {"role": "tool", "tool_call_id": "call_1", "content": result}]


def test_a_named_tool_choice_is_a_tool_call(llama: LlamaServer) -> None:
    answer = chat(llama, tools=TOOLS, tool_choice=NAMED).json()
    call_id = "call__0_get_time_" + answer["id"].removeprefix("chat")
    function = {"name": "get_time", "arguments": ARGUMENTS}
    assert answer["choices"][0] == {
        "index": 0,
        "message": {
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": function}],
            "role": "assistant",
            "function_call": function,  # the legacy field too
        },
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


def test_tools_without_a_named_choice_are_ignored(llama: LlamaServer) -> None:
    for choice in ({}, {"tool_choice": "auto"}, {"tool_choice": "required"}):
        answer = chat(llama, tools=TOOLS, **choice).json()["choices"][0]
        assert answer["message"] == {"content": ANSWER, "role": "assistant"}
        assert answer["finish_reason"] == "stop"


def test_a_streamed_tool_call_repeats_the_whole_call_in_every_chunk(llama: LlamaServer) -> None:
    _, data = stream(llama, tools=TOOLS, tool_choice=NAMED)
    assert events(data)[-1] == "[DONE]"
    parsed = chunks(data)
    assert all(list(c) == ["id", "object", "created", "model", "choices"] for c in parsed)
    deltas = [c["choices"][0]["delta"] for c in parsed]
    finishes = [c["choices"][0]["finish_reason"] for c in parsed]
    empty = {"role": None, "content": None, "function_call": None, "tool_calls": None}
    assert deltas[0] == empty | {"role": "assistant"}
    assert (deltas[-1], finishes[-1]) == (empty, "tool_calls")
    [call_id] = {d["tool_calls"][0]["id"] for d in deltas[1:-1]}
    fragments = []
    for delta in deltas[1:-1]:  # one token each, with the id, type and name every time
        [call] = delta["tool_calls"]
        fragments.append(call["function"]["arguments"])
        assert call == {
            "index": 0,
            "id": call_id,
            "type": "function",
            "function": {"name": "get_time", "arguments": fragments[-1]},
        }
        assert delta["function_call"] == call["function"]
    assert "".join(fragments) == ARGUMENTS
    assert len(fragments) > 3


def test_tool_round_trips_and_what_reaches_the_model(
    llama: LlamaServer, formats: dict[str, LlamaServer]
) -> None:
    # An assistant tool-call message needs a string content: null or none is a 500.
    assert chat(llama, messages=tool_round("x")).status_code == 200
    assert chat(llama, messages=tool_round("x", None)).status_code == 500
    missing = chat(llama, messages=tool_round("x", ...))
    assert (missing.status_code, missing.json()["error"]["message"]) == (500, "'content'")

    def prompt(server: LlamaServer, result: str) -> int:
        return chat(server, messages=tool_round(result)).json()["usage"]["prompt_tokens"]

    # The tool's result never reaches the model with ChatML (the format the server guesses)
    # nor with chatml-function-calling; the model's own Jinja template renders it.
    assert prompt(llama, "a") == prompt(llama, "a" * 50)
    calling = formats["chatml-function-calling"]
    assert prompt(calling, "a") == prompt(calling, "a" * 50)
    jinja = formats["chat_template.default"]
    assert prompt(jinja, "a" * 50) - prompt(jinja, "a") == 49


def test_content_parts_lose_their_text_or_fail(
    llama: LlamaServer, formats: dict[str, LlamaServer]
) -> None:
    def parts(text: str) -> list[dict[str, Any]]:
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        return [{"role": "user", "content": [{"type": "text", "text": text}, image]}]

    short, long = chat(llama, messages=parts("a")), chat(llama, messages=parts("a" * 50))
    assert short.status_code == long.status_code == 200  # accepted, but the text is gone
    assert short.json()["usage"]["prompt_tokens"] == long.json()["usage"]["prompt_tokens"]
    assert chat(formats["chat_template.default"], messages=parts("a")).status_code == 500


def test_chatml_function_calling_picks_a_tool_itself_but_cannot_stream_it(
    formats: dict[str, LlamaServer],
) -> None:
    calling = formats["chatml-function-calling"]
    message = chat(calling, tools=TOOLS, tool_choice="auto").json()["choices"][0]["message"]
    [call] = message["tool_calls"]
    assert call["function"]["arguments"] == ARGUMENTS and call["id"].startswith("call__0_")
    assert message["function_call"]["name"] == ""  # its legacy field loses the name
    response, data = stream(calling, tools=TOOLS, tool_choice="auto")
    assert (response.status_code, data) == (200, b"")  # a ValueError, after the 200


def test_json_mode(llama: LlamaServer) -> None:
    def content(response_format: dict[str, Any]) -> str:
        return chat(llama, response_format=response_format).json()["choices"][0]["message"][
            "content"
        ]

    assert content({"type": "json_object"}) == "{}"
    assert content({"type": "json_object", "schema": TIME}) == ARGUMENTS  # a llama.cpp extra
    schema = {"type": "json_schema", "json_schema": {"name": "t", "schema": TIME}}
    refused = chat(llama, response_format=schema)
    assert refused.status_code == 500  # not a 400: only text and json_object are known
    assert "Input should be 'text' or 'json_object'" in refused.json()["error"]["message"]


def test_requests_it_cannot_use_are_500s(llama: LlamaServer) -> None:
    missing = chat(llama, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    assert missing.status_code == 500
    assert missing.json()["error"] == {
        "message": "Tool choice 'x' not found in tools.",
        "type": "internal_server_error",
        "param": None,
        "code": None,
    }
    invalid = chat(llama, messages="hi")
    assert invalid.status_code == 500  # a validation error, not a 422
    assert invalid.json()["error"]["type"] == "internal_server_error"
    not_json = httpx.post(
        f"{llama.url}/v1/chat/completions",
        content=b"{",
        headers={"content-type": "application/json"},
    )
    assert (not_json.status_code, not_json.text) == (500, "Internal Server Error")


# -- the fixture's kill and restart -----------------------------------------------------
def test_a_killed_server_drops_its_stream_and_restarts_on_its_port() -> None:
    with running_llama() as server:
        port = server.port
        body = {"model": "m", "messages": CHAT, "stream": True} | LONG
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
        ):
            raw = r.iter_raw()
            next(raw)
            server.kill()
            list(raw)
        with pytest.raises(httpx.ConnectError):
            chat(server)
        server.restart()
        assert server.port == port
        assert chat(server).json()["choices"][0]["message"]["content"] == ANSWER
