"""The backend clients against stand-in transports: other servers' error dialects, streams
that break off, requests as each protocol wants them, keys never shown, the small pieces."""

from __future__ import annotations

import asyncio
import json
import pickle
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from tests.test_backends import KEY_ENV, PROTOCOLS, REQUEST, SECRET, make_config
from tierq import errors
from worker.backends import (
    AnthropicClient,
    BackendClient,
    BackendError,
    ChatAnswer,
    ErrorClass,
    OllamaClient,
    OpenAIClient,
    base,
    client_for,
    parse_retry_after,
)
from worker.backends.anthropic_answer import AnswerStream, finish_reason, fold_blocks
from worker.backends.ollama_messages import openai_tool_calls


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


# -- secrets ----------------------------------------------------------------------------
def _echoing_transport(seen: list[httpx.Request]) -> httpx.MockTransport:
    """A backend that rejects the key and, like some do, quotes it back."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        message = f"Incorrect API key provided: {SECRET}"
        return httpx.Response(401, json={"error": {"message": message, "type": "auth"}})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_api_key_is_sent_but_never_shown(protocol: str) -> None:
    seen: list[httpx.Request] = []
    http = httpx.AsyncClient(transport=_echoing_transport(seen))
    client = client_for(make_config(protocol, "http://backend.invalid"), http=http)
    with pytest.raises(BackendError) as caught:
        asyncio.run(chat_then_close(client, http))
    if protocol == "openai":
        assert seen[0].headers["authorization"] == f"Bearer {SECRET}"
    else:
        assert seen[0].headers["x-api-key"] == SECRET
        assert seen[0].headers["anthropic-version"] == "2023-06-01"
    error = caught.value
    assert error.error_class is ErrorClass.CLIENT and error.status == 401
    shown = [str(error), repr(error), error.message, *traceback.format_exception(error)]
    assert not any(SECRET in text for text in shown)
    assert "[redacted]" in error.message


def test_backend_error_survives_pickling() -> None:
    error = BackendError(ErrorClass.RATE_LIMITED, "b: HTTP 429: slow down", 429, 1.5)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.error_class, copy.message, copy.status, copy.retry_after) == (
        ErrorClass.RATE_LIMITED,
        "b: HTTP 429: slow down",
        429,
        1.5,
    )
    assert str(copy) == "rate_limited: b: HTTP 429: slow down"


# -- other servers' dialects, through a stand-in transport ------------------------------
async def chat_then_close(
    client: BackendClient, http: httpx.AsyncClient | None = None, request: dict[str, Any] = REQUEST
) -> ChatAnswer:
    """One chat call, then the client and the stand-in pool closed however it ended."""
    try:
        return await client.chat(request)
    finally:
        await client.aclose()
        if http is not None:
            await http.aclose()


def _answering(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.AsyncClient(
        transport=httpx.MockTransport(
            lambda request: httpx.Response(status, content=content, headers=headers)
        )
    )


DIALECTS: list[tuple[str, int, Any, ErrorClass]] = [
    # vLLM's older envelope
    (
        "openai",
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens.",
            "type": "BadRequestError",
            "code": 400,
        },
        ErrorClass.CONTEXT_LENGTH,
    ),
    # llama.cpp server
    (
        "openai",
        400,
        {
            "error": {
                "code": 400,
                "message": "request (4476 tokens) exceeds the available context size (4096 tokens)",
                "type": "exceed_context_size_error",
            }
        },
        ErrorClass.CONTEXT_LENGTH,
    ),
    # TGI
    (
        "openai",
        422,
        {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096"},
        ErrorClass.CONTEXT_LENGTH,
    ),
    ("openai", 404, {"error": {"message": "The model `x` does not exist"}}, ErrorClass.CLIENT),
    ("openai", 502, b"<html>Bad Gateway</html>", ErrorClass.SERVER),
    ("openai", 408, b"", ErrorClass.TIMEOUT),
    ("ollama", 404, {"error": "model 'llama9' not found, try pulling it first"}, ErrorClass.CLIENT),
    (
        "anthropic",
        400,
        {"type": "error", "error": {"type": "invalid_request_error", "message": "bad role"}},
        ErrorClass.CLIENT,
    ),
    ("anthropic", 200, {"type": "message", "content": "not a list"}, ErrorClass.MALFORMED),
]


@pytest.mark.parametrize(("protocol", "status", "body", "expected"), DIALECTS)
def test_error_dialects(protocol: str, status: int, body: Any, expected: ErrorClass) -> None:
    http = _answering(status, body)
    client = client_for(make_config(protocol, "http://backend.invalid"), http=http)
    with pytest.raises(BackendError) as caught:
        asyncio.run(chat_then_close(client, http))
    assert caught.value.error_class is expected
    assert caught.value.status == status


def test_rate_limit_with_an_http_date() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    http = _answering(429, {"error": "slow down"}, {"Retry-After": later})
    client = client_for(make_config("ollama", "http://backend.invalid"), http=http)
    with pytest.raises(BackendError) as caught:
        asyncio.run(chat_then_close(client, http))
    assert caught.value.retry_after is not None and 25 < caught.value.retry_after <= 30


def test_connect_timeout_is_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = client_for(make_config("openai", "http://backend.invalid"), http=http)
    with pytest.raises(BackendError) as caught:
        asyncio.run(chat_then_close(client, http))
    assert caught.value.error_class is ErrorClass.TIMEOUT
    assert "connect timeout after 1.0s" in caught.value.message


# -- streams that break off, through a stand-in transport -------------------------------
DELTA = b'{"type":"content_block_delta","delta":{"type":"text_delta","text":"Hel"}}'
CUT_OFF = {  # one delta, then the connection ends without the server's finish
    "openai": b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
    "ollama": b'{"message":{"role":"assistant","content":"Hel"},"done":false}\n',
    "anthropic": b'event: message_start\ndata: {"type":"message_start","message":{}}\n\n'
    b"event: content_block_delta\ndata: " + DELTA + b"\n\n",
}
FAILED_MIDWAY = {  # one delta, then the server reports an error inside the 200 stream
    "openai": CUT_OFF["openai"]
    + b'data: {"error":{"message":"overloaded","code":"engine_overloaded"}}\n\n',
    "ollama": CUT_OFF["ollama"] + b'{"error":"model runner has unexpectedly stopped"}\n',
    "anthropic": CUT_OFF["anthropic"]
    + b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"x"}}\n\n',
}


@pytest.mark.parametrize(
    ("protocol", "body", "expected"),
    [(p, CUT_OFF[p], ErrorClass.MALFORMED) for p in PROTOCOLS]
    + [
        ("openai", FAILED_MIDWAY["openai"], ErrorClass.OVERLOADED),
        ("ollama", FAILED_MIDWAY["ollama"], ErrorClass.SERVER),  # Ollama's error has no code
        ("anthropic", FAILED_MIDWAY["anthropic"], ErrorClass.OVERLOADED),
    ],
)
def test_a_stream_that_breaks_off_is_no_answer(
    protocol: str, body: bytes, expected: ErrorClass
) -> None:
    http = _answering(200, body)
    client = client_for(make_config(protocol, "http://backend.invalid"), http=http)
    deltas: list[dict[str, Any]] = []

    async def stream() -> ChatAnswer:
        async with http:
            return await client.stream(REQUEST, on_delta=deltas.append)

    with pytest.raises(BackendError) as caught:
        asyncio.run(stream())
    assert deltas == [{"content": "Hel"}]  # given as it arrived, before the stream broke off
    assert (caught.value.error_class, caught.value.status) == (expected, 200)


# -- requests as each protocol wants them -----------------------------------------------
def _capturing(answer: dict[str, Any], seen: list[httpx.Request]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=answer)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_anthropic_request_translation() -> None:
    seen: list[httpx.Request] = []
    answer = {"type": "message", "content": [{"type": "text", "text": "ok"}], "usage": {}}
    request = {
        "messages": [
            {"role": "system", "content": "Rule one."},
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
        "temperature": 1.7,
        "stop": "END",
    }
    http = _capturing(answer, seen)
    client = client_for(make_config("anthropic", "https://api.example.com/v1"), http=http)
    assert asyncio.run(chat_then_close(client, http, request)).content == "ok"
    assert str(seen[0].url) == "https://api.example.com/v1/messages"
    body = json.loads(seen[0].content)
    assert body["system"] == "Rule one."
    assert body["messages"] == [
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("m-1", 4096, 1.0)
    assert body["stop_sequences"] == ["END"]


def test_ollama_request_translation() -> None:
    seen: list[httpx.Request] = []
    answer = {"message": {"role": "assistant", "content": "ok"}, "done": True}
    request = REQUEST | {"max_tokens": 7, "seed": 3, "response_format": {"type": "json_object"}}
    http = _capturing(answer, seen)
    client = client_for(make_config("ollama", "http://ollama:11434"), http=http)
    assert asyncio.run(chat_then_close(client, http, request)).content == "ok"
    body = json.loads(seen[0].content)
    assert body["options"] == {"temperature": 0.2, "seed": 3, "num_predict": 7}
    assert (body["stream"], body["format"], body["model"]) == (False, "json", "m-1")


def test_openai_request_keeps_client_parameters() -> None:
    seen: list[httpx.Request] = []
    answer = {"model": "m-1", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
    http = _capturing(answer, seen)
    client = client_for(make_config("openai", "http://vllm:8000"), http=http)
    assert asyncio.run(chat_then_close(client, http, REQUEST | {"stream": True})).content == "ok"
    body = json.loads(seen[0].content)
    assert (body["model"], body["temperature"], "stream" in body) == ("m-1", 0.2, False)


# -- what each protocol cannot carry ---------------------------------------------------
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
BAD_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}
BAD_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("anthropic", {"role": "user", "content": [AUDIO]}),
    ("anthropic", {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}),
    ("anthropic", {"role": "assistant", "tool_calls": [BAD_CALL]}),
    ("ollama", {"role": "user", "content": [AUDIO]}),
    ("ollama", {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}),
    ("ollama", {"role": "assistant", "tool_calls": [BAD_CALL]}),
    ("ollama", {"role": "user", "content": [BAD_IMAGE]}),
]


@pytest.mark.parametrize(("protocol", "message"), REFUSED)
def test_what_a_protocol_cannot_carry_is_refused(protocol: str, message: dict[str, Any]) -> None:
    """Dropped silently, the part would leave a question the client did not ask."""
    client = client_for(make_config(protocol, "http://backend.invalid"))
    request = {"model": "any", "messages": [message, {"role": "user", "content": "and?"}]}
    with pytest.raises(BackendError) as caught:
        client.body(request, stream=False)
    asyncio.run(client.aclose())
    assert caught.value.error_class is ErrorClass.CLIENT


# -- answers in OpenAI's shape ----------------------------------------------------------
def _events(*events: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(e["type"], e) for e in events]


def _block(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _fragment(index: int, kind: str, key: str, value: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": kind, key: value}}


def test_an_anthropic_stream_of_text_and_tool_calls() -> None:
    """Block indexes are not tool-call indexes; a tool_use whose input came whole in its
    start (no input_json_delta) gives it as one argument piece when the block stops."""
    tool_a = {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {}}
    tool_b = {"type": "tool_use", "id": "toolu_b", "name": "g", "input": {"q": 1}}
    events = _events(
        {"type": "message_start", "message": {"model": "claude-x", "usage": {}}},
        _block(0, {"type": "text", "text": ""}),
        _fragment(0, "text_delta", "text", "Checking."),
        {"type": "content_block_stop", "index": 0},
        _block(1, tool_a),
        _fragment(1, "input_json_delta", "partial_json", ""),
        _fragment(1, "input_json_delta", "partial_json", '{"city": '),
        _fragment(1, "input_json_delta", "partial_json", '"x"}'),
        {"type": "content_block_stop", "index": 1},
        _block(2, tool_b),
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}},
        {"type": "message_stop"},
    )
    state = AnswerStream()
    deltas = [delta for kind, data in events for delta in state.take(kind, data)]

    def named(index: int, call_id: str, name: str) -> dict[str, Any]:
        function = {"name": name, "arguments": ""}
        return {"index": index, "id": call_id, "type": "function", "function": function}

    assert deltas == [
        {"content": "Checking."},
        {"tool_calls": [named(0, "toolu_a", "f")]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]},
        {"tool_calls": [named(1, "toolu_b", "g")]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"q": 1}'}}]},
    ]
    assert [c["function"]["arguments"] for c in state.tool_calls] == ['{"city": "x"}', '{"q": 1}']
    assert state.stopped and state.answer_content() == "Checking."
    assert finish_reason(state.stop_reason, bool(state.tool_calls)) == "tool_calls"


def test_an_anthropic_json_answer_is_content() -> None:
    answer_tool = {"type": "tool_use", "id": "toolu_j", "name": "json_answer", "input": {}}
    state = AnswerStream(json_tool="json_answer")
    events = _events(
        {"type": "message_start", "message": {}},
        _block(0, answer_tool),
        _fragment(0, "input_json_delta", "partial_json", '{"a": '),
        _fragment(0, "input_json_delta", "partial_json", "1}"),
        {"type": "content_block_stop", "index": 0},
    )
    deltas = [delta for kind, data in events for delta in state.take(kind, data)]
    assert deltas == [{"content": '{"a": '}, {"content": "1}"}]
    assert (state.answer_content(), state.tool_calls) == ('{"a": 1}', [])
    whole = fold_blocks([{**answer_tool, "input": {"a": 1}}], "json_answer")
    assert (whole.content, whole.tool_calls) == ('{"a": 1}', None)
    # Stopped for the answer tool alone, the answer is a plain stop, not a tool call.
    assert finish_reason("tool_use", False) == "stop"
    assert finish_reason("max_tokens", False) == "length"


def test_anthropic_whole_answer_blocks() -> None:
    blocks = [
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "text", "text": "Let me see."},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"n": [1, 2]}},
    ]
    folded = fold_blocks(blocks, None)
    assert folded.content == "Let me see."
    assert folded.tool_calls == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"n": [1, 2]}'},
        }
    ]
    assert fold_blocks([blocks[2]], None).content is None  # a tool call alone has no text


def test_ollama_tool_calls_in_openai_shape() -> None:
    calls = openai_tool_calls(
        [
            {"function": {"name": "f", "arguments": {"n": 1}}},
            {"function": {"name": "f", "arguments": {}}},
            {"id": "call_given", "function": {"name": "g", "arguments": {}}},
        ]
    )
    assert [c["function"] for c in calls] == [
        {"name": "f", "arguments": '{"n": 1}'},
        {"name": "f", "arguments": "{}"},
        {"name": "g", "arguments": "{}"},
    ]
    ids = [c["id"] for c in calls]
    assert ids[2] == "call_given" and ids[0] != ids[1] and ids[0].startswith("call_")
    assert {c["type"] for c in calls} == {"function"}


def test_ollama_streamed_tool_calls_keep_counting() -> None:
    """Tool calls on two lines of a stream are calls 0 and 1, each whole in one piece."""

    def line(message: dict[str, Any], done: bool = False) -> bytes:
        return json.dumps({"message": {"role": "assistant", **message}, "done": done}).encode()

    call = {"function": {"name": "f", "arguments": {"n": 1}}}
    body = b"\n".join(
        [
            line({"content": "", "tool_calls": [call]}),
            line({"content": "", "tool_calls": [call]}),
            line({"content": ""}, done=True),
        ]
    )
    http = _answering(200, body + b"\n")
    client = client_for(make_config("ollama", "http://backend.invalid"), http=http)
    deltas: list[dict[str, Any]] = []

    async def stream() -> ChatAnswer:
        async with http:
            return await client.stream(REQUEST, on_delta=deltas.append)

    answer = asyncio.run(stream())
    assert [d["tool_calls"][0]["index"] for d in deltas] == [0, 1]
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas] == ['{"n": 1}'] * 2
    assert [c["id"] for c in answer.tool_calls or []] == [d["tool_calls"][0]["id"] for d in deltas]
    assert (answer.finish_reason, answer.content, len(answer.tool_calls or [])) == (
        "tool_calls",
        None,
        2,
    )


# -- small pieces -----------------------------------------------------------------------
def test_client_for_picks_the_protocol() -> None:
    kinds: dict[str, Callable[..., BackendClient]] = {
        "openai": OpenAIClient,
        "ollama": OllamaClient,
        "anthropic": AnthropicClient,
    }
    for protocol, kind in kinds.items():
        client = client_for(make_config(protocol, "http://backend.invalid"))
        assert type(client) is kind
        asyncio.run(client.aclose())


def test_error_classes() -> None:
    assert base.ErrorClass is errors.ErrorClass is ErrorClass  # the old import path works
    assert [c.value for c in ErrorClass] == [
        "connect",
        "timeout",
        "server",
        "overloaded",
        "rate_limited",
        "malformed",
        "context_length",
        "client",
    ]
    assert {c for c in ErrorClass if not c.retryable} == {
        ErrorClass.CONTEXT_LENGTH,
        ErrorClass.CLIENT,
    }


def test_parse_retry_after() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=120)
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"Retry-After": "0.25"}) == 0.25
    assert parse_retry_after(httpx.Headers({"RETRY-AFTER": "3"})) == 3.0
    in_two_minutes = parse_retry_after({"retry-after": format_datetime(soon, usegmt=True)})
    assert in_two_minutes is not None and 115 < in_two_minutes <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "2"}) == 2.0
    for garbage in ("soon", "-5", "nan", "inf", "", "Mon, 99 Foo 2025"):
        assert parse_retry_after({"retry-after": garbage}) is None, garbage
    assert parse_retry_after({}) is None
