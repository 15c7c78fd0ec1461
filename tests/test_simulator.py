"""The simulator against the unmodified OpenAI and Anthropic SDKs, and raw HTTP for Ollama."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from simulator.cli import _parser, initial_faults
from simulator.control import SimulatorControl
from simulator.faults import FaultSettings, Mode, faults_from_env
from simulator.server import bind
from tests.simulator_fixture import running_simulator, running_simulators
from tests.test_llama_wire import (
    ENDED,
    check_empty_stream,
    check_interrupted,
    chunks,
    events,
    in_background,
    interrupted,
    queued_stream,
    raw_post,
)

NAME = "sim-a"
CHAT: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello big world"},
]
ANSWER = f"[{NAME}] You said: hello big world"
PROMPT_WORDS = 5  # "Be brief." + "hello big world"
OLLAMA_BODY = {"model": "llama3.2:3b", "messages": CHAT}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_simulator(NAME) as url:
        yield url


@pytest.fixture(scope="module")
def admin(base_url: str) -> Iterator[SimulatorControl]:
    with SimulatorControl(base_url) as ctl:
        yield ctl


@pytest.fixture
def control(admin: SimulatorControl) -> SimulatorControl:
    """The simulator's admin client, with the simulator back to no faults and no counts."""
    admin.reset()
    return admin


@pytest.fixture
def oai(base_url: str, control: SimulatorControl) -> openai.OpenAI:
    # max_retries=0: the SDK would otherwise retry faults behind the test's back.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)


@pytest.fixture
def claude(base_url: str, control: SimulatorControl) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0)


# -- OpenAI -----------------------------------------------------------------------------
def test_openai_sdk_completes_a_chat(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="gpt-x", messages=CHAT)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-x"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_WORDS
    assert completion.usage.completion_tokens == len(ANSWER.split())
    assert completion.usage.total_tokens == PROMPT_WORDS + len(ANSWER.split())


def test_openai_sdk_streams_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-x",
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ANSWER.split())


def test_openai_max_tokens_cuts_the_answer(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="m", messages=CHAT, max_tokens=3)
    assert completion.choices[0].message.content == f"[{NAME}] You said:"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_openai_models_list(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == [NAME]


def test_openai_sdk_sees_protocol_errors(oai: openai.OpenAI, control: SimulatorControl) -> None:
    control.set_faults(mode="context_length")
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="m", messages=CHAT)
    assert bad.value.code == "context_length_exceeded"
    control.set_faults(mode="rate_limit", retry_after=2.5)
    with pytest.raises(openai.RateLimitError) as limited:
        oai.chat.completions.create(model="m", messages=CHAT)
    assert limited.value.response.headers["retry-after-ms"] == "2500"
    assert limited.value.response.headers["retry-after"] == "3"
    control.set_faults(mode="overloaded")
    with pytest.raises(openai.InternalServerError) as overloaded:
        oai.chat.completions.create(model="m", messages=CHAT)
    assert overloaded.value.status_code == 503


# -- Anthropic --------------------------------------------------------------------------
def test_anthropic_sdk_creates_a_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="claude-x",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello big world"}],
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == ANSWER
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == PROMPT_WORDS
    assert message.usage.output_tokens == len(ANSWER.split())


def test_anthropic_sdk_streams(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="claude-x",
        max_tokens=4,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello big world"}]}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == f"[{NAME}] You said: hello"
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 4
    assert final.usage.input_tokens == 3


def test_anthropic_sdk_sees_its_error_shapes(
    claude: anthropic.Anthropic, control: SimulatorControl
) -> None:
    control.set_faults(mode="overloaded")
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        claude.messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    control.set_faults(max_context_words=2)
    with pytest.raises(anthropic.BadRequestError) as too_long:
        claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "one two three"}]
        )
    assert "prompt is too long" in too_long.value.message


def test_anthropic_models_list_is_told_apart_by_header(claude: anthropic.Anthropic) -> None:
    page = claude.models.list()
    assert [m.id for m in page.data] == [NAME]
    assert page.data[0].type == "model"


# -- Ollama -----------------------------------------------------------------------------
def test_ollama_streams_ndjson_by_default(base_url: str, control: SimulatorControl) -> None:
    with httpx.stream("POST", f"{base_url}/api/chat", json=OLLAMA_BODY) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(line["message"]["content"] for line in lines) == ANSWER
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    final = lines[-1]
    assert final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == PROMPT_WORDS
    assert final["eval_count"] == len(ANSWER.split())
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert final["model"] == "llama3.2:3b"


def test_ollama_non_streaming_and_liveness(base_url: str, control: SimulatorControl) -> None:
    body = OLLAMA_BODY | {"stream": False, "options": {"num_predict": 2}}
    answer = httpx.post(f"{base_url}/api/chat", json=body).json()
    assert answer["message"] == {"role": "assistant", "content": f"[{NAME}] You"}
    assert answer["done"] is True
    assert answer["done_reason"] == "length"
    tags = httpx.get(f"{base_url}/api/tags").json()
    assert tags["models"][0]["name"] == f"{NAME}:latest"
    assert httpx.get(f"{base_url}/api/version").json()["version"]


# -- faults and the admin API -----------------------------------------------------------
def test_admin_rejects_unknown_and_invalid_fields(base_url: str, control: SimulatorControl) -> None:
    assert httpx.put(f"{base_url}/_sim/faults", json={"mood": "bad"}).status_code == 422
    assert httpx.put(f"{base_url}/_sim/faults", json={"mode": "sideways"}).status_code == 422
    assert httpx.put(f"{base_url}/_sim/faults", content=b"[1]").status_code == 422
    assert httpx.patch(f"{base_url}/_sim/faults", json={"count": 0}).status_code == 422
    assert control.state()["faults"]["mode"] == "ok"


def test_faults_switch_at_runtime(base_url: str, control: SimulatorControl) -> None:
    url = f"{base_url}/v1/chat/completions"
    body = {"model": "m", "messages": CHAT}
    assert httpx.post(url, json=body).status_code == 200
    control.set_faults(mode="error_500", latency_ms=10)
    assert httpx.post(url, json=body).status_code == 500
    control.patch_faults(mode="ok")
    assert control.state()["faults"]["latency_ms"] == 10  # PATCH kept the rest
    assert httpx.post(url, json=body).status_code == 200


def test_count_faults_the_next_n_requests_only(base_url: str, control: SimulatorControl) -> None:
    url = f"{base_url}/api/chat"
    control.set_faults(mode="overloaded", count=2, latency_ms=1)
    assert httpx.post(url, json=OLLAMA_BODY).status_code == 503
    assert control.state()["faults"]["count"] == 1
    assert httpx.post(url, json=OLLAMA_BODY).status_code == 503
    assert httpx.post(url, json=OLLAMA_BODY).status_code == 200
    faults = control.state()["faults"]
    assert (faults["mode"], faults["count"], faults["latency_ms"]) == ("ok", None, 1)


def test_stats_count_requests_per_endpoint(base_url: str, control: SimulatorControl) -> None:
    assert control.received() == 0
    httpx.get(f"{base_url}/v1/models")
    httpx.post(f"{base_url}/api/chat", json=OLLAMA_BODY | {"stream": False})
    httpx.post(f"{base_url}/api/chat", json=OLLAMA_BODY | {"stream": False})
    control.state()  # admin calls are not counted
    stats = control.stats()
    assert stats["endpoints"] == {"GET /v1/models": 1, "POST /api/chat": 2}
    assert stats["total"] == 3
    assert control.received("POST /v1/messages") == 0
    control.reset()
    assert control.received() == 0


def test_scope_chat_keeps_liveness_answering(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="error_500", scope="chat")
    assert httpx.get(f"{base_url}/api/version").status_code == 200
    assert httpx.post(f"{base_url}/api/chat", json=OLLAMA_BODY).status_code == 500


def test_max_context_words_applies_in_ok_mode(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(max_context_words=PROMPT_WORDS)
    url = f"{base_url}/v1/chat/completions"
    assert httpx.post(url, json={"model": "m", "messages": CHAT}).status_code == 200
    longer = [*CHAT, {"role": "user", "content": "one more"}]
    error = httpx.post(url, json={"model": "m", "messages": longer})
    assert error.status_code == 400
    assert error.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 5 tokens" in error.json()["error"]["message"]


def test_reset_drops_the_connection_without_a_response(
    base_url: str, control: SimulatorControl
) -> None:
    control.set_faults(mode="reset")
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.post(f"{base_url}/v1/messages", json={"model": "m"})
    assert control.stats()["faults"] == {"reset": 1}


def test_hang_never_answers(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{base_url}/api/tags", timeout=httpx.Timeout(2, read=0.2))


def test_malformed_and_wrong_shape(base_url: str, control: SimulatorControl) -> None:
    url = f"{base_url}/v1/chat/completions"
    control.set_faults(mode=Mode.MALFORMED)
    response = httpx.post(url, json={"model": "m", "messages": CHAT})
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()
    control.set_faults(mode=Mode.WRONG_SHAPE)
    data = httpx.post(url, json={"model": "m", "messages": CHAT}).json()
    assert "choices" not in data


def test_latency_and_token_pacing(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(latency_ms=100, tokens_per_second=100)
    started = time.monotonic()
    arrivals = []
    with httpx.stream("POST", f"{base_url}/api/chat", json=OLLAMA_BODY) as response:
        for line in response.iter_lines():
            if line:
                arrivals.append(time.monotonic() - started)
    assert arrivals[0] >= 0.1  # latency before the first byte, then one token per 10 ms
    assert arrivals[-1] - arrivals[0] >= 0.8 * (len(ANSWER.split()) - 1) / 100


# -- initial faults and the multi-instance server ---------------------------------------
def test_initial_faults_from_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "TIERQ_SIM_FAULTS": '{"latency_ms": 5}',
        "TIERQ_SIM_FAULTS__GPU_VLLM": '{"mode": "hang"}',
    }
    assert faults_from_env("gpu-vllm", env) == FaultSettings(mode=Mode.HANG, latency_ms=5)
    assert faults_from_env("other", env) == FaultSettings(latency_ms=5)
    with pytest.raises(ValueError, match="TIERQ_SIM_FAULTS"):
        faults_from_env("x", {"TIERQ_SIM_FAULTS": "[1]"})
    monkeypatch.setenv("TIERQ_SIM_FAULTS", '{"retry_after": 7}')
    args = _parser().parse_args(
        ["a:1", "b:2", "--faults", 'b={"mode":"reset"}', "--latency-ms", "3"]
    )
    faults = initial_faults(args)
    assert faults["a"] == FaultSettings(latency_ms=3, retry_after=7)
    assert faults["b"] == FaultSettings(mode=Mode.RESET, latency_ms=3, retry_after=7)


def test_several_instances_in_one_thread_each() -> None:
    with running_simulators("one", "two") as urls:
        names = {httpx.get(f"{url}/_sim/state").json()["name"] for url in urls.values()}
    assert names == {"one", "two"}


def test_serve_forever_runs_named_instances_until_sigterm() -> None:
    ports = []
    for _ in range(2):
        sock = bind("127.0.0.1", 0)
        ports.append(sock.getsockname()[1])
        sock.close()
    env = os.environ | {"TIERQ_SIM_FAULTS__BETA": '{"mode": "overloaded"}'}
    command = [sys.executable, "-m", "simulator", f"alpha:{ports[0]}", f"beta={ports[1]}"]
    with subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE) as process:
        try:
            _wait_for(f"http://127.0.0.1:{ports[1]}/_sim/state")
            alpha = httpx.post(f"http://127.0.0.1:{ports[0]}/api/chat", json=OLLAMA_BODY)
            lines = [json.loads(line) for line in alpha.text.splitlines()]
            assert "".join(x["message"]["content"] for x in lines).startswith("[alpha] ")
            beta = httpx.post(f"http://127.0.0.1:{ports[1]}/api/chat", json=OLLAMA_BODY)
            assert beta.status_code == 503
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr


def _wait_for(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(url)


# -- bad_request, the request log, counters reset alone ---------------------------------
REASON = "temperature: must be at most 1 for this model"


def test_bad_request_in_each_protocols_error_shape(
    base_url: str, oai: openai.OpenAI, claude: anthropic.Anthropic, control: SimulatorControl
) -> None:
    control.set_faults(mode="bad_request", error_message=REASON)
    with pytest.raises(openai.BadRequestError) as openai_error:
        oai.chat.completions.create(model="m", messages=CHAT)
    assert openai_error.value.body == {  # type: ignore[comparison-overlap]
        "message": REASON,
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(anthropic.BadRequestError) as anthropic_error:
        claude.messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    body = anthropic_error.value.body
    assert body["error"] == {"type": "invalid_request_error", "message": REASON}  # type: ignore[index]
    ollama = httpx.post(f"{base_url}/api/chat", json=OLLAMA_BODY)
    assert (ollama.status_code, ollama.json()) == (400, {"error": REASON})
    # A liveness probe has no request to reject: it keeps answering.
    assert httpx.get(f"{base_url}/api/version").status_code == 200
    assert control.stats()["faults"] == {"bad_request": 3}


def test_bad_request_has_a_default_reason(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="bad_request")
    answer = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert answer.status_code == 400
    assert "not supported" in answer.json()["error"]["message"]
    assert httpx.put(f"{base_url}/_sim/faults", json={"error_message": ""}).status_code == 422


def test_request_log_keeps_what_clients_sent(base_url: str, control: SimulatorControl) -> None:
    before = time.time()
    body = {"model": "m", "messages": CHAT, "max_tokens": 7, "temperature": 0}
    httpx.post(f"{base_url}/v1/chat/completions", json=body)
    control.set_faults(mode="error_500")
    httpx.get(f"{base_url}/api/tags")
    httpx.post(f"{base_url}/v1/messages", content=b"not json")
    log = control.requests()
    assert [(r["endpoint"], r["fault"]) for r in log] == [
        ("POST /v1/chat/completions", "ok"),
        ("GET /api/tags", "error_500"),
        ("POST /v1/messages", "error_500"),
    ]
    assert log[0]["body"] == body
    assert log[1]["body"] is None and log[2]["body"] == "not json"
    assert before <= log[0]["at"] <= log[1]["at"] <= log[2]["at"] <= time.time()
    first = log[0]["seq"]  # never reused, across resets too
    assert [r["seq"] for r in log] == [first, first + 1, first + 2]
    assert control.requests("GET /api/tags") == [log[1]]


def test_stats_reset_keeps_the_faults(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="overloaded", latency_ms=1)
    httpx.post(f"{base_url}/api/chat", json=OLLAMA_BODY)
    assert control.received() == 1
    stats = control.reset_stats()
    assert (stats["total"], stats["max_in_flight"], stats["faults"]) == (0, 0, {})
    assert control.requests() == []
    assert control.state()["faults"]["mode"] == "overloaded"
    assert httpx.post(f"{base_url}/api/chat", json=OLLAMA_BODY).status_code == 503


def test_max_in_flight_counts_concurrent_requests(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(latency_ms=300)
    url = f"{base_url}/v1/chat/completions"

    async def three_at_once() -> None:
        async with httpx.AsyncClient() as client:
            body = {"model": "m", "messages": CHAT}
            await asyncio.gather(*(client.post(url, json=body) for _ in range(3)))

    asyncio.run(three_at_once())
    assert control.stats()["max_in_flight"] == 3
    control.reset_stats()
    httpx.post(url, json={"model": "m", "messages": CHAT})
    assert control.stats()["max_in_flight"] == 1


# -- requests the client gives up on ----------------------------------------------------
def _stats_within(control: SimulatorControl, seconds: float, **expected: int) -> dict[str, Any]:
    """The stats once they show ``expected``; fails if they do not within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        stats = control.stats()
        if all(stats[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            assert {k: stats[k] for k in expected} == expected
            return stats
        time.sleep(0.02)


def test_a_plain_answer_stops_when_the_client_goes_away(
    base_url: str, control: SimulatorControl
) -> None:
    control.set_faults(latency_ms=5000)
    with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection on a timeout
        httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"model": "m", "messages": CHAT},
            timeout=httpx.Timeout(5, read=0.3),
        )
    # Long before the 5 s of "generating" are over: the simulator noticed at once.
    stats = _stats_within(control, 1.0, aborted=1, in_flight=0)
    assert stats["endpoints"] == {"POST /v1/chat/completions": 1}


def test_a_stream_stops_when_the_client_goes_away(base_url: str, control: SimulatorControl) -> None:
    control.set_faults(tokens_per_second=2)
    body = OLLAMA_BODY | {"messages": [{"role": "user", "content": "one two three four five"}]}
    with httpx.stream("POST", f"{base_url}/api/chat", json=body) as response:
        lines = response.iter_lines()
        first = json.loads(next(lines))  # the stream has begun: one word, then a pause
        assert first["done"] is False
        assert control.stats()["in_flight"] == 1
    _stats_within(control, 1.0, aborted=1, in_flight=0)  # leaving the block closed it


def test_finished_and_dropped_requests_are_not_aborted(
    base_url: str, control: SimulatorControl
) -> None:
    control.set_faults(latency_ms=20, tokens_per_second=500)
    url = f"{base_url}/v1/chat/completions"
    assert httpx.post(url, json={"model": "m", "messages": CHAT}).status_code == 200
    with httpx.stream("POST", url, json={"model": "m", "messages": CHAT, "stream": True}) as r:
        assert r.read().endswith(b"data: [DONE]\n\n")
    control.patch_faults(mode="reset")  # the simulator closes it, not the client
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.post(url, json={"model": "m", "messages": CHAT})
    stats = _stats_within(control, 1.0, in_flight=0)
    assert (stats["aborted"], stats["total"]) == (0, 3)


def test_hang_counts_the_client_giving_up_and_stats_reset_zeroes_it(
    base_url: str, control: SimulatorControl
) -> None:
    control.set_faults(mode="hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{base_url}/api/tags", timeout=httpx.Timeout(2, read=0.2))
    _stats_within(control, 1.0, aborted=1, in_flight=0)
    assert control.reset_stats()["aborted"] == 0


# -- tools, tool results, structured output, images -------------------------------------
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 3},
        "alerts": {"type": "boolean"},
        "where": {"$ref": "#/$defs/Place"},
        "optional": {"type": "number"},
    },
    "required": ["city", "unit", "days", "alerts", "where"],
    "$defs": {
        "Place": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "tags": {"type": "array"}},
            "required": ["lat", "tags"],
        }
    },
}
WEATHER_ARGS = {
    "city": "x",
    "unit": "celsius",
    "days": 3,
    "alerts": True,
    "where": {"lat": 1, "tags": []},
}
TIME = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
ANTHROPIC_TOOLS = [
    {"name": "get_weather", "description": "d", "input_schema": WEATHER},
    {"name": "get_time", "description": "d", "input_schema": TIME},
]
ASK = [{"role": "user", "content": "weather in Paris?"}]


def _tool_round(call_id: str, arguments: str) -> list[Any]:
    """The conversation after the model called get_weather and the tool answered."""
    function = {"name": "get_weather", "arguments": arguments}
    called = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": function}],
    }
    return [*ASK, called, {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"}]


def test_minimal_instances_validate_against_their_schemas() -> None:
    import jsonschema

    from simulator.schema import minimal_instance

    schemas: list[dict[str, Any]] = [
        WEATHER,
        {"type": ["null", "string"], "minLength": 3},
        {"anyOf": [{"type": "null"}, {"type": "integer", "exclusiveMinimum": 5}]},
        {"allOf": [TIME, {"type": "object", "properties": {"n": {"const": 2}}, "required": ["n"]}]},
        {"type": "array", "items": {"$ref": "#/$defs/T"}, "minItems": 2, "$defs": {"T": TIME}},
        {"type": "number", "maximum": 0.5},
        {
            "$ref": "#/$defs/Node",
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {"next": {"$ref": "#/$defs/Node"}},
                    "required": ["next"],
                }
            },
        },
    ]
    for schema in schemas[:-1]:
        jsonschema.validate(minimal_instance(schema), schema)
    assert minimal_instance(WEATHER) == WEATHER_ARGS
    assert minimal_instance(schemas[-1])  # a recursive schema ends, if not validly


def test_openai_calls_the_first_tool_with_arguments_its_schema_accepts(
    oai: openai.OpenAI,
) -> None:
    completion = oai.chat.completions.create(model="m", messages=ASK, tools=OPENAI_TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == WEATHER_ARGS  # type: ignore[union-attr]


def test_openai_tool_choice_names_the_tool_or_forbids_tools(oai: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    completion = oai.chat.completions.create(
        model="m",
        messages=ASK,
        tools=OPENAI_TOOLS,
        tool_choice=named,  # type: ignore[arg-type]
    )
    [call] = completion.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_time", '{"zone": "x"}')  # type: ignore[union-attr]
    plain = oai.chat.completions.create(
        model="m", messages=ASK, tools=OPENAI_TOOLS, tool_choice="none"
    )
    assert plain.choices[0].message.content == f"[{NAME}] You said: weather in Paris?"
    assert plain.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="not found in 'tools'"):
        missing = {"type": "function", "function": {"name": "nope"}}
        oai.chat.completions.create(
            model="m",
            messages=ASK,
            tools=OPENAI_TOOLS,
            tool_choice=missing,  # type: ignore[arg-type]
        )


def test_openai_streams_a_tool_call_as_openai_does(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(model="m", messages=ASK, tools=OPENAI_TOOLS, stream=True)
    )
    first = chunks[0].choices[0].delta
    [head] = first.tool_calls or []
    assert first.role == "assistant" and first.content is None
    assert (head.index, head.type, head.function.arguments) == (0, "function", "")  # type: ignore[union-attr]
    assert head.id is not None and head.id.startswith("call_")
    assert head.function.name == "get_weather"  # type: ignore[union-attr]
    fragments = [c.choices[0].delta.tool_calls for c in chunks[1:-1]]
    assert len(fragments) >= 3
    assert all(f and f[0].index == 0 and f[0].id is None for f in fragments)
    arguments = "".join(f[0].function.arguments for f in fragments)  # type: ignore[index,union-attr,misc]
    assert json.loads(arguments) == WEATHER_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices[0].delta.tool_calls is None


def test_openai_tool_result_goes_back_as_context(oai: openai.OpenAI) -> None:
    messages = _tool_round("call_1", json.dumps(WEATHER_ARGS))
    completion = oai.chat.completions.create(model="m", messages=messages, tools=OPENAI_TOOLS)
    assert completion.choices[0].message.content == f"[{NAME}] The tool said: sunny, 21 C"
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"


def test_openai_structured_output_parses_with_the_sdk(oai: openai.OpenAI) -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        capital: bool
        districts: list[str]

    class Answer(BaseModel):
        city: City
        rank: float

    parsed = oai.chat.completions.parse(model="m", messages=ASK, response_format=Answer)
    assert parsed.choices[0].message.parsed == Answer(
        city=City(name="x", population=1, capital=True, districts=[]), rank=1
    )
    mode = {"type": "json_object"}
    plain = oai.chat.completions.create(model="m", messages=ASK, response_format=mode)  # type: ignore[arg-type]
    assert json.loads(plain.choices[0].message.content or "") == {
        "answer": f"[{NAME}] You said: weather in Paris?"
    }


def test_anthropic_tool_use_plain_and_streamed(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="c",
        max_tokens=50,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
    )
    [block] = message.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert (block.name, block.input) == ("get_weather", WEATHER_ARGS)
    assert message.stop_reason == "tool_use"
    with claude.messages.stream(
        model="c",
        max_tokens=50,
        messages=ASK,  # type: ignore[arg-type]
        tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "tool", "name": "get_time"},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [e.type for e in events].count("input_json") >= 2
    [streamed] = final.content
    assert streamed.type == "tool_use"
    assert (streamed.name, streamed.input) == ("get_time", {"zone": "x"})
    assert final.stop_reason == "tool_use"


def test_anthropic_tool_result_and_tool_choice_none(claude: anthropic.Anthropic) -> None:
    called = {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": WEATHER_ARGS}
        ],
    }
    result = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "sunny, 21 C"}],
            }
        ],
    }
    message = claude.messages.create(
        model="c",
        max_tokens=50,
        messages=[*ASK, called, result],
        tools=ANTHROPIC_TOOLS,  # type: ignore[list-item,arg-type]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == f"[{NAME}] The tool said: sunny, 21 C"
    assert message.stop_reason == "end_turn"
    none = claude.messages.create(
        model="c",
        max_tokens=50,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "none"},  # type: ignore[arg-type]
    )
    assert none.content[0].type == "text" and none.stop_reason == "end_turn"


def test_ollama_tools_format_and_tool_results(base_url: str, control: SimulatorControl) -> None:
    url = f"{base_url}/api/chat"
    body = {"model": "q", "messages": ASK, "tools": OPENAI_TOOLS, "stream": False}
    answer = httpx.post(url, json=body).json()
    assert answer["message"] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": WEATHER_ARGS}}],
    }
    assert (answer["done"], answer["done_reason"]) == (True, "stop")
    lines = [json.loads(x) for x in httpx.post(url, json=body | {"stream": True}).text.split()]
    assert [x["done"] for x in lines] == [False, True]
    assert lines[0]["message"]["tool_calls"] == answer["message"]["tool_calls"]
    assert "tool_calls" not in lines[1]["message"] and lines[1]["done_reason"] == "stop"
    result = {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}
    messages = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": answer["message"]["tool_calls"]},
        result,
    ]
    after = httpx.post(url, json=body | {"messages": messages}).json()
    assert after["message"] == {
        "role": "assistant",
        "content": f"[{NAME}] The tool said: sunny, 21 C",
    }
    shaped = httpx.post(url, json={"model": "q", "messages": ASK, "format": TIME, "stream": False})
    assert json.loads(shaped.json()["message"]["content"]) == {"zone": "x"}
    loose = httpx.post(url, json={"model": "q", "messages": ASK, "format": "json", "stream": False})
    assert isinstance(json.loads(loose.json()["message"]["content"]), dict)


def test_image_parts_are_accepted_and_counted(
    base_url: str, oai: openai.OpenAI, claude: anthropic.Anthropic, control: SimulatorControl
) -> None:
    pixel = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5E"
        "rkJggg=="
    )
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
    ]
    completion = oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": parts}]
    )  # type: ignore[list-item,misc]
    assert completion.choices[0].message.content == f"[{NAME}] You said: what is this?"
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": pixel},
    }
    message = claude.messages.create(
        model="c",
        max_tokens=20,
        messages=[
            {"role": "user", "content": [image, image, {"type": "text", "text": "and these?"}]}
        ],  # type: ignore[list-item]
    )
    assert message.content[0].text == f"[{NAME}] You said: and these?"  # type: ignore[union-attr]
    ollama = {"role": "user", "content": "and this?", "images": [pixel]}
    assert (
        httpx.post(f"{base_url}/api/chat", json={"model": "q", "messages": [ollama]}).status_code
        == 200
    )
    assert [r["images"] for r in control.requests()] == [1, 2, 1]


# -- llama.cpp's server (llama-cpp-python), as tests/test_llama_wire.py pins it ---------
WORDY = [{"role": "user", "content": "word " * 40}]  # a 43-word answer


def _chat_url(base_url: str) -> str:
    return f"{base_url}/v1/chat/completions"


def test_slots_one_generation_at_a_time(base_url: str, control: SimulatorControl) -> None:
    """As test_llama_wire.test_one_generation_at_a_time; without slots, side by side."""
    long = {"model": "m", "messages": WORDY}
    short = {"model": "m", "messages": CHAT, "max_tokens": 1}
    for slots, waits in ((1, True), (None, False)):
        control.set_faults(slots=slots, tokens_per_second=100)
        ends: dict[str, float] = {}
        threads = [in_background(lambda: httpx.post(_chat_url(base_url), json=long), ends, "long")]
        time.sleep(0.1)
        threads += [
            in_background(lambda: httpx.post(_chat_url(base_url), json=short), ends, "short"),
            in_background(lambda: httpx.get(f"{base_url}/v1/models"), ends, "models"),
        ]
        for thread in threads:
            thread.join()
        assert (ends["short"] > ends["long"] - ENDED) is waits
        assert (ends["models"] > ends["long"] - ENDED) is waits


def test_slots_a_waiting_stream_gets_its_headers_at_once(
    base_url: str, control: SimulatorControl
) -> None:
    """As test_llama_wire.test_a_waiting_stream_gets_its_headers_at_once."""
    control.set_faults(slots=1, tokens_per_second=100)
    ends: dict[str, float] = {}
    long = {"model": "m", "messages": WORDY}
    generating = in_background(lambda: httpx.post(_chat_url(base_url), json=long), ends, "long")
    time.sleep(0.1)
    body = {"model": "m", "messages": CHAT, "stream": True, "max_tokens": 1}
    with httpx.stream("POST", _chat_url(base_url), json=body) as response:
        headers = time.monotonic()
        raw = response.iter_raw()
        next(raw)
        first_event = time.monotonic()
        list(raw)  # read to the end: a stream left behind would count as aborted later
    generating.join()
    assert response.status_code == 200
    assert headers < ends["long"] - ENDED
    assert first_event > ends["long"] - ENDED


def test_interrupt_streams_ends_a_stream_as_llama_cpp_does(
    base_url: str, control: SimulatorControl
) -> None:
    """As test_llama_wire.test_a_new_request_ends_a_running_stream_with_done_and_a_dropped_
    connection and test_even_a_models_listing_interrupts_a_stream."""
    control.set_faults(slots=1, interrupt_streams=True, tokens_per_second=50)
    body = {"model": "m", "messages": WORDY, "stream": True}
    short = {"model": "m", "messages": CHAT, "max_tokens": 3}
    newcomers = {
        "chat": lambda: httpx.post(_chat_url(base_url), json=short),
        "models": lambda: httpx.get(f"{base_url}/v1/models"),
    }
    for name, newcomer in newcomers.items():
        data, error, other = interrupted(_chat_url(base_url), body, newcomer)
        assert len(check_interrupted(data, error)) < 40, name
        assert other.status_code == 200
    assert other.json()["data"][0]["id"] == NAME
    stats = _stats_within(control, 1.0, in_flight=0)
    assert (stats["interrupted"], stats["aborted"]) == (2, 0)


def test_interrupt_streams_cuts_a_stream_that_waited_if_another_waits_behind_it(
    base_url: str, control: SimulatorControl
) -> None:
    """As test_llama_wire.test_a_stream_that_waited_is_cut_at_once_by_one_waiting_behind_it."""
    control.set_faults(slots=1, interrupt_streams=True, tokens_per_second=100)
    data, error, answer = queued_stream(
        _chat_url(base_url),
        {"model": "m", "messages": WORDY},
        {"model": "m", "messages": WORDY, "stream": True},
        {"model": "m", "messages": CHAT, "max_tokens": 1},
    )
    assert len(check_interrupted(data, error)) <= 2
    assert answer.status_code == 200


def test_interrupt_streams_only_with_the_knob(base_url: str, control: SimulatorControl) -> None:
    """As test_llama_wire.test_without_interrupt_requests_a_newcomer_waits."""
    control.set_faults(slots=1, tokens_per_second=100)
    body = {"model": "m", "messages": WORDY, "stream": True}
    short = {"model": "m", "messages": CHAT, "max_tokens": 3}
    newcomer = lambda: httpx.post(_chat_url(base_url), json=short)  # noqa: E731
    data, error, other = interrupted(_chat_url(base_url), body, newcomer)
    assert error is None
    assert chunks(data)[-1]["choices"][0]["finish_reason"] == "stop"
    assert other.status_code == 200
    assert control.stats()["interrupted"] == 0


def test_interrupt_streams_the_openai_sdk_ends_quietly(
    oai: openai.OpenAI, base_url: str, control: SimulatorControl
) -> None:
    """As test_llama_wire.test_the_openai_sdk_sees_an_interrupted_stream_end_quietly."""
    control.set_faults(slots=1, interrupt_streams=True, tokens_per_second=50)
    received = oai.chat.completions.create(model="m", messages=WORDY, stream=True)  # type: ignore[arg-type]
    first = next(iter(received))
    assert first.choices[0].delta.role == "assistant"
    httpx.post(_chat_url(base_url), json={"model": "m", "messages": CHAT, "max_tokens": 1})
    rest = list(received)
    assert len(rest) < 40
    assert {c.choices[0].finish_reason for c in rest} <= {None}


def test_overflow_stream_empty(base_url: str, control: SimulatorControl) -> None:
    """As test_llama_wire.test_a_streamed_prompt_over_the_context_is_an_empty_200."""
    port = int(base_url.rsplit(":", 1)[1])
    body = {"model": "m", "messages": CHAT, "stream": True}
    control.set_faults(max_context_words=2, overflow_stream="empty")
    check_empty_stream(raw_post(port, "/v1/chat/completions", body))
    control.set_faults(mode="context_length", overflow_stream="empty")
    check_empty_stream(raw_post(port, "/v1/chat/completions", body))
    control.set_faults(max_context_words=2)  # the protocol's error, as before
    assert httpx.post(_chat_url(base_url), json=body).status_code == 400
    control.set_faults(max_context_words=2, overflow_stream="empty")
    plain = httpx.post(_chat_url(base_url), json=body | {"stream": False})
    assert plain.status_code == 400  # only streams: a plain overflow is a 400 there too
    ollama = httpx.post(f"{base_url}/api/chat", json=OLLAMA_BODY)
    assert ollama.status_code == 400  # an OpenAI stream's behaviour only


def test_stream_usage_false_never_sends_usage(base_url: str, control: SimulatorControl) -> None:
    """As test_llama_wire.test_a_stream_never_carries_usage."""
    body = {"model": "m", "messages": CHAT, "stream": True}
    asked = body | {"stream_options": {"include_usage": True}}
    assert any(c.get("usage") for c in chunks(httpx.post(_chat_url(base_url), json=asked).content))
    control.set_faults(stream_usage=False)
    plain = httpx.post(_chat_url(base_url), json=body).content
    data = httpx.post(_chat_url(base_url), json=asked).content
    assert len(events(data)) == len(events(plain))
    assert all("usage" not in c for c in chunks(data))
