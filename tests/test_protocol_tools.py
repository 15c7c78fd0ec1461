"""Tools, tool results, JSON output and images over the Anthropic and Ollama protocols.

Against the real simulator, plain and streamed: a tool call comes back in OpenAI's shape
(streamed as OpenAI's tool-call pieces), a tool result goes back as context, a JSON answer
is JSON, an image reaches the server in the protocol's shape (read from the simulator's
request log). Then the translation tables, as pure functions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from simulator.control import SimulatorControl
from tests.simulator_fixture import running_simulator
from tests.test_backends import KEY_ENV, SECRET, make_config
from worker.backends import BackendError, ChatAnswer, ErrorClass, client_for
from worker.backends.anthropic_messages import json_tool_of, to_turns, tool_choice, tool_fields
from worker.backends.base import Delta
from worker.backends.ollama_messages import ollama_messages, ollama_tools
from worker.backends.openai_stream import StreamState

PROTOCOLS = ["anthropic", "ollama"]
HOW = ["chat", "stream"]
ENDPOINT = {"anthropic": "POST /v1/messages", "ollama": "POST /api/chat"}
PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
# The simulated model calls a tool with the smallest arguments its schema accepts.
MINIMAL_ARGS = {"city": "x", "unit": "celsius"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": PARAMETERS,
        "strict": True,
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n-not-really-an-image").decode()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with running_simulator("sim-t") as url:
        yield url


def ask(
    url: str, protocol: str, request: dict[str, Any], how: str
) -> tuple[ChatAnswer, list[Delta]]:
    """One call (``chat`` or ``stream``) on a fresh client: the answer and the deltas."""
    deltas: list[Delta] = []

    async def call() -> ChatAnswer:
        async with client_for(make_config(protocol, url)) as client:
            if how == "chat":
                return await client.chat(request)
            return await client.stream(request, on_delta=deltas.append)

    return asyncio.run(call()), deltas


def folded(deltas: list[Delta]) -> ChatAnswer:
    """The deltas put together as an OpenAI stream consumer does."""
    state = StreamState()
    for delta in deltas:
        state.take({"delta": delta})
    return state.answer("-")


def sent(url: str, protocol: str, mark: str) -> dict[str, Any]:
    """The body the simulator received last whose first message mentions ``mark``."""
    with SimulatorControl(url) as control:
        log = control.requests(ENDPOINT[protocol])
    bodies = [r["body"] for r in log if mark in json.dumps(r["body"]["messages"][0])]
    assert bodies, f"no request with {mark}"
    return bodies[-1]


def question(text: str = "weather in Paris?", **fields: Any) -> dict[str, Any]:
    """A request whose first message starts with a mark of its own, to find it in the log."""
    mark = f"m{uuid.uuid4().hex[:10]}"
    return {"model": "any", "messages": [{"role": "user", "content": f"{mark} {text}"}], **fields}


def mark_of(request: dict[str, Any]) -> str:
    content = request["messages"][0]["content"]
    return (content if isinstance(content, str) else content[0]["text"]).split()[0]


# -- tool calls ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_tool_call_comes_back_in_openai_shape(sim: str, protocol: str, how: str) -> None:
    answer, deltas = ask(sim, protocol, question(tools=[WEATHER]), how)
    assert (answer.finish_reason, answer.content) == ("tool_calls", None)
    [call] = answer.tool_calls or []
    assert call["type"] == "function" and isinstance(call["id"], str) and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == MINIMAL_ARGS
    if how == "chat":
        return
    first = deltas[0]["tool_calls"][0]
    assert (first["index"], first["id"], first["function"]["name"]) == (
        0,
        call["id"],
        "get_weather",
    )
    assert folded(deltas).tool_calls == [call]
    if protocol == "anthropic":  # input_json_delta fragments are argument pieces
        assert first["function"]["arguments"] == "" and len(deltas) > 2
    else:  # Ollama sends a call whole: one first piece with all of its arguments
        assert deltas == [{"tool_calls": [{"index": 0, **call}]}]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_named_tool_choice_reaches_the_server(sim: str, protocol: str) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    request = question(tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
    answer, _ = ask(sim, protocol, request, "chat")
    assert [c["function"]["name"] for c in answer.tool_calls or []] == ["get_time"]
    body = sent(sim, protocol, mark_of(request))
    if protocol == "anthropic":
        weather = {"name": "get_weather", "input_schema": PARAMETERS}
        assert body["tools"] == [
            weather | {"description": "The weather now in a city."},
            {"name": "get_time", "input_schema": {"type": "object"}},
        ]
        assert body["tool_choice"] == {
            "type": "tool",
            "name": "get_time",
            "disable_parallel_tool_use": True,
        }
    else:  # Ollama has no tool_choice: the named tool is the only one offered
        assert body["tools"] == [TIME]


# -- tool results --------------------------------------------------------------------------
def conversation() -> dict[str, Any]:
    """A question, two tool calls (one id with characters Anthropic refuses), their results."""
    request = question(tools=[WEATHER])

    def call(call_id: str, city: str) -> dict[str, Any]:
        arguments = json.dumps({"city": city, "unit": "celsius"})
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": arguments},
        }

    request["messages"] += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("functions.get_weather:0", "Paris"), call("call_2", "Oslo")],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain, 9 C"},
    ]
    return request


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_tool_result_goes_back_as_context(sim: str, protocol: str, how: str) -> None:
    request = conversation()
    answer, deltas = ask(sim, protocol, request, how)
    assert "The tool said:" in (answer.content or "") and "rain, 9 C" in (answer.content or "")
    assert (answer.finish_reason, answer.tool_calls) == ("stop", None)
    if how == "stream":
        assert folded(deltas).content == answer.content
    messages = sent(sim, protocol, mark_of(request))["messages"]
    paris, oslo = {"city": "Paris", "unit": "celsius"}, {"city": "Oslo", "unit": "celsius"}
    if protocol == "anthropic":
        # An id Anthropic refuses is made safe, the same way in the call and in its result.
        safe = "functions_get_weather_0"
        uses = [
            {"type": "tool_use", "id": safe, "name": "get_weather", "input": paris},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": oslo},
        ]
        results = [
            {"type": "tool_result", "tool_use_id": safe, "content": "sunny, 21 C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "rain, 9 C"},
        ]
        assert messages[1:] == [
            {"role": "assistant", "content": uses},
            {"role": "user", "content": results},  # both results in one user turn
        ]
        assert "sunny, 21 C" in (answer.content or "")
    else:
        calls = [{"function": {"name": "get_weather", "arguments": args}} for args in (paris, oslo)]
        assert messages[1:] == [
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
            {"role": "tool", "content": "rain, 9 C", "tool_name": "get_weather"},
        ]


# -- JSON output ---------------------------------------------------------------------------
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": PARAMETERS}}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_json_answers_are_json(sim: str, protocol: str, kind: str, how: str) -> None:
    response_format = SCHEMA_FORMAT if kind == "json_schema" else {"type": "json_object"}
    answer, deltas = ask(sim, protocol, question(response_format=response_format), how)
    assert (answer.finish_reason, answer.tool_calls) == ("stop", None)
    value = json.loads(answer.content or "")
    assert isinstance(value, dict)
    if kind == "json_schema":
        assert value == MINIMAL_ARGS  # the smallest instance of the schema asked for
    if how == "stream":
        assert all(set(d) == {"content"} for d in deltas)
        assert "".join(d["content"] for d in deltas) == answer.content


def test_anthropic_json_lets_offered_tools_be_called(sim: str) -> None:
    """Tools offered beside a JSON format may still be called: any tool, never free text."""
    request = question(tools=[WEATHER], response_format=SCHEMA_FORMAT)
    answer, _ = ask(sim, "anthropic", request, "chat")
    assert [c["function"]["name"] for c in answer.tool_calls or []] == ["get_weather"]
    body = sent(sim, "anthropic", mark_of(request))
    assert body["tool_choice"] == {"type": "any"}
    assert [t["name"] for t in body["tools"]] == ["get_weather", "json_answer"]
    assert body["tools"][1]["input_schema"] == PARAMETERS


# -- images --------------------------------------------------------------------------------
def picture(*urls: str) -> dict[str, Any]:
    request = question("what is in these?")
    text = request["messages"][0]["content"]
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    request["messages"][0]["content"] = [{"type": "text", "text": text}, *parts]
    return request


@pytest.mark.parametrize("how", HOW)
def test_anthropic_images_are_image_blocks(sim: str, how: str) -> None:
    request = picture(f"data:image/png;base64,{PNG}", "https://example.com/cat.jpg")
    answer, _ = ask(sim, "anthropic", request, how)
    assert "what is in these?" in (answer.content or "")
    [turn] = sent(sim, "anthropic", mark_of(request))["messages"]
    assert turn["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize("how", HOW)
def test_ollama_images_are_base64_on_the_message(sim: str, how: str) -> None:
    request = picture(f"data:image/png;base64,{PNG}")
    answer, _ = ask(sim, "ollama", request, how)
    assert "what is in these?" in (answer.content or "")
    [message] = sent(sim, "ollama", mark_of(request))["messages"]
    assert message["images"] == [PNG]
    assert message["content"] == request["messages"][0]["content"][0]["text"]


def test_ollama_refuses_an_image_by_address(sim: str) -> None:
    """Ollama takes images inline only; the worker does not fetch what a client names."""
    with SimulatorControl(sim) as control:
        before = control.received(ENDPOINT["ollama"])
        with pytest.raises(BackendError) as caught:
            ask(sim, "ollama", picture("https://example.com/cat.jpg"), "chat")
        assert control.received(ENDPOINT["ollama"]) == before  # refused before sending
    assert caught.value.error_class is ErrorClass.CLIENT
    assert "data: URL" in caught.value.message


# -- the translation tables, as pure functions -------------------------------------------------
TOOL_CHOICES: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    ({}, None),  # Anthropic's default is auto
    ({"parallel_tool_calls": True}, None),
    ({"tool_choice": "auto"}, {"type": "auto"}),
    ({"tool_choice": "required"}, {"type": "any"}),
    ({"tool_choice": "none"}, {"type": "none"}),
    (
        {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        {"type": "tool", "name": "get_time"},
    ),
    ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
    (
        {"tool_choice": "required", "parallel_tool_calls": False},
        {"type": "any", "disable_parallel_tool_use": True},
    ),
    ({"tool_choice": "none", "parallel_tool_calls": False}, {"type": "none"}),
]


@pytest.mark.parametrize(("fields", "expected"), TOOL_CHOICES)
def test_anthropic_tool_choice(fields: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert tool_choice({"tools": [WEATHER, TIME], **fields}) == expected


NAMED_JSON_ANSWER = {"type": "function", "function": {"name": "json_answer"}}
JSON_OBJECT = {"type": "json_object"}
JSON_TOOLS: list[tuple[dict[str, Any], list[str], dict[str, Any]]] = [
    # (request fields, the tools sent, the tool choice sent)
    ({"response_format": SCHEMA_FORMAT}, ["json_answer"], {"type": "tool", "name": "json_answer"}),
    (
        {"tools": [WEATHER], "response_format": JSON_OBJECT},
        ["get_weather", "json_answer"],
        {"type": "any"},  # a tool call, or the JSON answer: never free text
    ),
    (
        {"tools": [WEATHER], "parallel_tool_calls": False, "response_format": JSON_OBJECT},
        ["get_weather", "json_answer"],
        {"type": "any", "disable_parallel_tool_use": True},
    ),
    (
        {"tools": [WEATHER], "tool_choice": "none", "response_format": SCHEMA_FORMAT},
        ["get_weather", "json_answer"],
        {"type": "tool", "name": "json_answer"},
    ),
    (  # this turn must call one of the client's tools: no JSON answer in it
        {"tools": [WEATHER], "tool_choice": "required", "response_format": SCHEMA_FORMAT},
        ["get_weather"],
        {"type": "any"},
    ),
    (  # the answer tool never shadows a tool of the client's
        {"tools": [NAMED_JSON_ANSWER], "response_format": JSON_OBJECT},
        ["json_answer", "json_answer_"],
        {"type": "any"},
    ),
]


@pytest.mark.parametrize(("fields", "names", "choice"), JSON_TOOLS)
def test_anthropic_json_answer_tool(
    fields: dict[str, Any], names: list[str], choice: dict[str, Any]
) -> None:
    sent_fields = tool_fields(fields, [])
    assert [t["name"] for t in sent_fields["tools"]] == names
    assert sent_fields["tool_choice"] == choice
    if (json_tool := json_tool_of(fields)) is not None:
        [answer_tool] = [t for t in sent_fields["tools"] if t["name"] == json_tool]
        schema = PARAMETERS if fields["response_format"] is SCHEMA_FORMAT else {"type": "object"}
        assert answer_tool["input_schema"] == schema


def test_anthropic_declares_the_tools_of_past_calls() -> None:
    """Tool calls in the conversation and no tools offered now: the calls' tools are
    declared, and none may be called."""
    assert tool_fields({}, ["get_weather", "get_weather"]) == {
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "none"},
    }
    assert tool_fields({}, []) == {}


def test_anthropic_turns() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    turns = to_turns(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
            {"role": "user", "content": "hm"},  # out of place: the results come first
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
        ]
    )
    assert turns == [
        {"role": "user", "content": "a"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "42"},
                {"type": "text", "text": "hm"},
            ],
        },
    ]


def test_anthropic_documents() -> None:
    pdf = base64.b64encode(b"%PDF-1.4 tiny").decode()
    text = base64.b64encode(b"plain words").decode()
    files = [
        {"file_data": f"data:application/pdf;base64,{pdf}", "filename": "a.pdf"},
        {"file_data": f"data:text/plain;base64,{text}"},
    ]
    parts = [{"type": "file", "file": file} for file in files]
    [turn] = to_turns([{"role": "user", "content": parts}])
    assert turn["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": pdf},
            "title": "a.pdf",
        },
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "plain words"},
        },
    ]


NOT_STRICT = {k: v for k, v in WEATHER["function"].items() if k != "strict"}
OLLAMA_TOOLS: list[tuple[dict[str, Any], list[Any] | None]] = [
    ({}, [{"type": "function", "function": NOT_STRICT}, TIME]),  # strict means nothing there
    ({"tool_choice": "none"}, None),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, [TIME]),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "expected"), OLLAMA_TOOLS)
def test_ollama_tools(fields: dict[str, Any], expected: list[Any] | None) -> None:
    assert ollama_tools({"tools": [WEATHER, TIME], **fields}) == expected


def test_ollama_messages() -> None:
    call = {"id": "c9", "type": "function", "function": {"name": "f", "arguments": '{"n": 1}'}}
    messages = ollama_messages(
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c9", "content": "one"},
            {"role": "tool", "tool_call_id": "unknown", "content": "two"},
        ]
    )
    sent_call = {"name": "f", "arguments": {"n": 1}}  # an object, not JSON text
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": sent_call}]},
        {"role": "tool", "content": "one", "tool_name": "f"},
        {"role": "tool", "content": "two"},  # no call to name it by
    ]  # fmt: skip
