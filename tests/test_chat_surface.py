"""The whole Chat Completions surface through tierq, with the unmodified OpenAI SDK: tool
calls (plain and streamed), tool results as context (in the messages list and in tierq's
conversations), structured output, content parts, server extras and streamed usage.

One real deployment for the module (API, relay, a gpu worker; Postgres and Redis), whose
gpu tier is the simulator speaking OpenAI's protocol. What reached the backend is read
from the simulator's request log, found by a marker unique to each request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.deployment import Deployment, backend, deployment, tier
from tests.llama_server import MODEL_NAME, LlamaServer, llama

__all__ = ["llama"]  # the session fixture, imported for pytest
pytestmark = pytest.mark.slow

SIM = "gpu-sim"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "default": None},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
# The simulated model calls the tool with the smallest arguments its schema accepts.
WEATHER_ARGS = {"city": "x", "unit": "celsius"}


def gpu_tier(urls: dict[str, str]) -> dict[str, Any]:
    return {"tiers": [tier("gpu", backend(SIM, "openai", urls[SIM]))]}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("chat"), config=gpu_tier, simulators=(SIM,)) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        yield d


@pytest.fixture
def client(d: Deployment) -> OpenAI:
    return OpenAI(base_url=f"{d.stack.api_url}/v1", api_key=d.key, max_retries=0)


def marker() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def sent_with(d: Deployment, mark: str) -> list[dict[str, Any]]:
    """The chat bodies the backend received whose messages mention ``mark``, oldest first."""
    log = httpx.get(f"{d.simulators[SIM]}/_sim/requests").json()["requests"]
    return [
        entry["body"]
        for entry in log
        if entry["endpoint"] == "POST /v1/chat/completions"
        and any(mark in _text(m.get("content")) for m in entry["body"].get("messages", []))
    ]


def logged_with(d: Deployment, mark: str) -> dict[str, Any]:
    log = httpx.get(f"{d.simulators[SIM]}/_sim/requests").json()["requests"]
    found = [e for e in log if mark in json.dumps(e["body"])]
    assert len(found) == 1, found
    return found[0]


def job(d: Deployment, job_id: str) -> dict[str, Any]:
    with d.client() as http:
        return http.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()


def ask(mark: str, text: str = "what is the weather in Paris?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"{text} ({mark})"}]


# -- tool calls -----------------------------------------------------------------------------


def test_a_tool_call_comes_back_whole(d: Deployment, client: OpenAI) -> None:
    mark = marker()
    raw = client.chat.completions.with_raw_response.create(
        model="tierq", messages=ask(mark), tools=[WEATHER], tool_choice="auto"
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS

    # The tools reached the backend as sent (a null default included), with the choice.
    (body,) = sent_with(d, mark)
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "auto"

    # The stored answer and the conversation's assistant turn keep the call.
    stored = job(d, raw.headers["x-tierq-job-id"])
    message = stored["result"]["choices"][0]["message"]
    assert message["tool_calls"] == [call.model_dump(exclude_none=True)]
    with d.client() as http:
        turns = http.get(f"/v1/conversations/{stored['conversation_id']}").json()["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"]
    assert turns[1]["message"]["tool_calls"] == message["tool_calls"]


def test_a_streamed_tool_call_arrives_in_pieces(d: Deployment, client: OpenAI) -> None:
    mark = marker()
    stream = client.chat.completions.create(
        model="tierq", messages=ask(mark), tools=[WEATHER], stream=True
    )
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    # As OpenAI streams a call: index, id, type and name first, then the arguments' text.
    first, *rest = pieces
    assert first.index == 0 and first.id and first.id.startswith("call_")
    assert first.function and first.function.name == "get_weather"
    assert len(rest) >= 2, "the arguments came in one piece: not streamed"
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in rest)
    arguments = "".join((p.function.arguments or "") for p in pieces)
    assert json.loads(arguments) == WEATHER_ARGS
    stored = job(d, stream.response.headers["x-tierq-job-id"])
    call = stored["result"]["choices"][0]["message"]["tool_calls"][0]
    assert call["id"] == first.id and call["function"]["arguments"] == arguments

    # The SDK's stream helper puts the pieces back together.
    with client.chat.completions.stream(
        model="tierq", messages=ask(marker()), tools=[WEATHER]
    ) as helper:
        events = [event.type for event in helper]
        final = helper.get_final_completion()
    assert "tool_calls.function.arguments.delta" in events
    assert final.choices[0].finish_reason == "tool_calls"
    (whole,) = final.choices[0].message.tool_calls or []
    assert whole.function.name == "get_weather"
    assert json.loads(whole.function.arguments) == WEATHER_ARGS


def test_a_tool_result_is_answered_in_the_messages_list(d: Deployment, client: OpenAI) -> None:
    mark = marker()
    messages: list[Any] = ask(mark)
    first = client.chat.completions.create(model="tierq", messages=messages, tools=[WEATHER])
    (call,) = first.choices[0].message.tool_calls or []
    # The usual agent loop: the SDK's own message object goes back as the assistant turn.
    messages.append(first.choices[0].message)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"})
    second = client.chat.completions.create(model="tierq", messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "[gpu-sim] The tool said: 18 C and sunny"
    assert not second.choices[0].message.tool_calls

    _, body = sent_with(d, mark)
    assistant, result = body["messages"][1:]
    assert assistant["role"] == "assistant"
    assert assistant["tool_calls"] == [call.model_dump(exclude_none=True)]
    assert result == {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}


def test_a_tool_result_is_answered_in_a_conversation(d: Deployment) -> None:
    mark = marker()
    with d.client() as http:
        created = http.post("/v1/conversations", json={"system": "You report the weather."})
        conversation = created.json()["id"]
        url = f"/v1/conversations/{conversation}/messages"
        body = {"model": "tierq", "messages": ask(mark), "tools": [WEATHER]}
        asked = job(d, http.post(url, json=body).json()["id"])
        message = asked["result"]["choices"][0]["message"]
        (call,) = message["tool_calls"]
        assert call["function"]["name"] == "get_weather"

        # Only the tool's result is sent: the rest of the context is the conversation.
        result = {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}
        answered = job(d, http.post(url, json={**body, "messages": [result]}).json()["id"])
        assert answered["status"] == "succeeded"
        text = answered["result"]["choices"][0]["message"]["content"]
        assert text == "[gpu-sim] The tool said: 18 C and sunny"
        turns = http.get(f"/v1/conversations/{conversation}").json()["turns"]

    # The backend got the whole conversation back, the assistant's tool call included.
    _, sent = sent_with(d, mark)
    assert sent["messages"] == [
        {"role": "system", "content": "You report the weather."},
        ask(mark)[0],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        result,
    ]
    assert [(t["seq"], t["role"]) for t in turns] == [
        (0, "system"), (1, "user"), (2, "assistant"), (3, "tool"), (4, "assistant")
    ]  # fmt: skip
    assert turns[2]["message"]["tool_calls"] == [call]
    assert turns[2]["job_id"] == asked["id"] and turns[4]["job_id"] == answered["id"]
    assert turns[3]["message"] == result and turns[3]["content"] == "18 C and sunny"
    assert turns[4]["message"]["content"] == text


# -- structured output ----------------------------------------------------------------------


class Forecast(BaseModel):
    city: str
    high: int
    conditions: list[str]


def test_json_schema_output_parses_and_validates(d: Deployment, client: OpenAI) -> None:
    mark = marker()
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 3},
            "high": {"type": "integer", "minimum": -60, "maximum": 60},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        },
        "required": ["city", "high", "tags"],
        "additionalProperties": False,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "forecast", "schema": schema, "strict": True},
    }
    completion = client.chat.completions.create(
        model="tierq",
        messages=ask(mark),
        response_format=response_format,  # type: ignore[arg-type]
    )
    data = json.loads(completion.choices[0].message.content or "")
    jsonschema.validate(data, schema)
    (body,) = sent_with(d, mark)
    assert body["response_format"] == response_format  # "schema", not a renamed field

    # The SDK's parse: a pydantic model in, an instance of it out.
    parsed = client.chat.completions.parse(
        model="tierq", messages=ask(marker()), response_format=Forecast
    )
    forecast = parsed.choices[0].message.parsed
    assert isinstance(forecast, Forecast) and forecast.city and forecast.conditions == []


# -- content parts and server extras --------------------------------------------------------

PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def test_content_parts_reach_the_backend_as_parts(d: Deployment, client: OpenAI) -> None:
    mark = marker()
    parts = [
        {"type": "text", "text": f"What is in this picture? ({mark})"},
        {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
    ]
    completion = client.chat.completions.create(
        model="tierq",
        messages=[{"role": "user", "content": parts}],  # type: ignore[misc]
    )
    assert completion.choices[0].message.content == (
        f"[gpu-sim] You said: What is in this picture? ({mark})"
    )
    entry = logged_with(d, mark)
    assert entry["body"]["messages"] == [{"role": "user", "content": parts}]
    assert entry["images"] == 1


def test_server_extras_reach_the_backend_unchanged(d: Deployment, client: OpenAI) -> None:
    mark = marker()
    extras = {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.05,
        "chat_template_kwargs": {"enable_thinking": False, "note": None},
    }
    completion = client.chat.completions.create(
        model="tierq", messages=ask(mark), max_completion_tokens=50, extra_body=extras
    )
    assert completion.choices[0].finish_reason == "stop"
    (body,) = sent_with(d, mark)
    assert {k: body.get(k) for k in extras} == extras
    assert body["max_completion_tokens"] == 50 and body["model"] == "gpu-sim-model"


def test_the_sdks_newer_fields_are_accepted_and_passed_on(d: Deployment, client: OpenAI) -> None:
    """Values and shapes the SDK documents (its types: ReasoningEffort, service_tier,
    custom tools, allowed_tools) are not refused by tierq; the backend decides."""
    mark = marker()
    fields: dict[str, Any] = {
        "reasoning_effort": "xhigh",
        "service_tier": "fast",
        "verbosity": "low",
        "prompt_cache_key": "weather-bot",
        "safety_identifier": "user-1234",
        "metadata": {"team": "weather"},
        "store": False,
    }
    completion = client.chat.completions.create(model="tierq", messages=ask(mark), **fields)
    assert completion.choices[0].message.content == f"[gpu-sim] You said: {ask(mark)[0]['content']}"
    (body,) = sent_with(d, mark)
    assert {k: body.get(k) for k in fields} == fields

    # A custom tool (free-text input in a grammar), allowed_tools, and a custom tool call
    # sent back with its result: the backend gets them as sent, and whatever it says is the
    # answer (the simulator knows function tools only: its 400, not a 422 of tierq's).
    mark = marker()
    custom = {
        "type": "custom",
        "custom": {
            "name": "count",
            "description": "Counts.",
            "format": {"type": "grammar", "grammar": {"syntax": "regex", "definition": r"\d+"}},
        },
    }
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "auto",
            "tools": [{"type": "custom", "custom": {"name": "count"}}],
        },
    }
    called = {"id": "call_1", "type": "custom", "custom": {"name": "count", "input": "42"}}
    messages = [
        *ask(mark),
        {"role": "assistant", "content": None, "tool_calls": [called]},
        {"role": "tool", "tool_call_id": "call_1", "content": "counted"},
    ]
    try:
        client.chat.completions.create(
            model="tierq", messages=messages, tools=[WEATHER, custom], tool_choice=allowed
        )
    except openai.BadRequestError as refused:
        assert refused.code == "backend_refused" and "tools.1" in str(refused)
    (body,) = sent_with(d, mark)
    assert body["tools"] == [WEATHER, custom] and body["tool_choice"] == allowed
    assert body["messages"][1] == {"role": "assistant", "tool_calls": [called]}

    # What no tool offered is still refused at the door, naming the field.
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        client.chat.completions.create(
            model="tierq",
            messages=ask(marker()),
            tools=[custom],
            tool_choice={"type": "custom", "custom": {"name": "get_weather"}},
        )
    assert unknown.value.param == "tool_choice" and "get_weather" in str(unknown.value)


# -- usage in streams -----------------------------------------------------------------------


def usage_stream(client: OpenAI, messages: Any, **options: Any) -> tuple[list[Any], Any]:
    """The chunks before the last, and the last, of a stream that asked for usage."""
    stream = client.chat.completions.create(
        model="tierq",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **options,
    )
    *before, last = list(stream)
    assert last.choices == [] and last.usage is not None
    assert all(chunk.usage is None for chunk in before)
    return before, last.usage


def test_a_stream_with_include_usage_ends_with_the_usage(d: Deployment, client: OpenAI) -> None:
    mark = marker()
    before, usage = usage_stream(client, ask(mark, "count these six words please"))
    assert before[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in before)
    assert text == f"[gpu-sim] You said: count these six words please ({mark})"
    # The server's own counts (the simulator counts words), not made-up ones.
    assert usage.prompt_tokens == 6
    assert usage.completion_tokens == len(text.split())
    assert usage.total_tokens == 6 + len(text.split())

    # A streamed tool call is counted too (the arguments' fragments are its tokens).
    before, usage = usage_stream(client, ask(marker(), "four words, then"), tools=[WEATHER])
    assert before[-1].choices[0].finish_reason == "tool_calls"
    fragments = [
        p.function.arguments
        for c in before
        for p in (c.choices[0].delta.tool_calls or [])
        if p.function and p.function.arguments
    ]
    assert usage.prompt_tokens == 4 and usage.completion_tokens == len(fragments)

    # Without include_usage, no chunk carries usage.
    plain = list(client.chat.completions.create(model="tierq", messages=ask(mark), stream=True))
    assert all(chunk.usage is None for chunk in plain)


def test_usage_a_stream_did_not_report_is_null(d: Deployment, client: OpenAI) -> None:
    d.fault(SIM, stream_usage=False)
    try:
        stream = client.chat.completions.create(
            model="tierq",
            messages=ask(marker()),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    finally:
        httpx.post(f"{d.simulators[SIM]}/_sim/reset").raise_for_status()
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    stored = job(d, stream.response.headers["x-tierq-job-id"])
    assert stored["status"] == "succeeded"
    usage = stored["result"]["usage"]
    assert usage == {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}


# -- a real llama.cpp server behind tierq -----------------------------------------------------


@pytest.fixture(scope="module")
def on_llama(tmp_path_factory: pytest.TempPathFactory, llama: LlamaServer) -> Iterator[Deployment]:
    """A deployment whose only backend is llama.cpp: logprobs in every streamed chunk, no
    usage in streams (include_usage ignored)."""

    def llama_tier(urls: dict[str, str]) -> dict[str, Any]:
        served = backend("llama", "openai", llama.url, model=MODEL_NAME, read_timeout=30)
        return {"tiers": [tier("gpu", served)]}

    with deployment(tmp_path_factory.mktemp("llama"), config=llama_tier, simulators=()) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        yield d


def test_logprobs_and_unknown_usage_through_a_stream(on_llama: Deployment) -> None:
    client = OpenAI(base_url=f"{on_llama.stack.api_url}/v1", api_key=on_llama.key, max_retries=0)
    options: dict[str, Any] = {
        "model": "tierq",
        "messages": ask(marker()),
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_headers": {"Idempotency-Key": f"logprobs-{uuid.uuid4()}"},
    }
    stream = client.chat.completions.create(**options)
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    text = "".join(texts)
    assert len(texts) > 1 and text.split() == ["Hello", "from", "the", "tiny"]
    # Each chunk's logprobs came with it, as the server sent them.
    assert "".join(e.token for e in entries) == text
    assert all(len(e.top_logprobs) == 2 for e in entries)

    job_id = stream.response.headers["x-tierq-job-id"]
    stored = job(on_llama, job_id)
    assert stored["status"] == "succeeded"
    choice = stored["result"]["choices"][0]
    assert choice["message"]["content"] == text
    assert [e["token"] for e in choice["logprobs"]["content"]] == [e.token for e in entries]
    # llama.cpp reports no usage in a stream: unknown, not zero; the last chunk says so.
    unknown = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}
    assert stored["result"]["usage"] == unknown
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens is None

    # The same request again (the job has ended): the stored answer in one chunk, with its
    # logprobs.
    again = list(client.chat.completions.create(**options))
    (whole,) = [c for c in again if c.choices and c.choices[0].delta.content]
    assert whole.choices[0].delta.content == text
    assert whole.choices[0].logprobs is not None
    assert [e.token for e in whole.choices[0].logprobs.content or []] == [e.token for e in entries]


# -- folding a stream (no deployment) --------------------------------------------------------


def test_streamed_tool_calls_of_both_kinds_are_put_back_together() -> None:
    """OpenAI streams a function call's arguments and a custom tool's free-text input in
    fragments under the call's index; the stored answer has each call whole, of its kind."""
    from worker.backends.openai_stream import StreamState

    function = {"name": "get_weather", "arguments": ""}
    pieces = [
        {"index": 0, "id": "call_a", "type": "function", "function": function},
        {"index": 1, "id": "call_b", "type": "custom", "custom": {"name": "count", "input": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 1, "custom": {"input": "4"}},
        {"index": 0, "function": {"arguments": '"x"}'}},
        {"index": 1, "custom": {"input": "2"}},
    ]
    state = StreamState()
    passed = [state.take({"delta": {"tool_calls": [piece]}}) for piece in pieces]
    assert passed == [{"tool_calls": [piece]} for piece in pieces]  # passed on as they came
    state.take({"delta": {}, "finish_reason": "tool_calls"})
    answer = state.answer("m")
    assert answer.finish_reason == "tool_calls" and answer.content is None
    assert answer.tool_calls == [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "x"}'}},
        {"id": "call_b", "type": "custom", "custom": {"name": "count", "input": "42"}},
    ]  # fmt: skip
