"""tierq in front of a real llama.cpp server (llama-cpp-python's, tests/llama_server.py),
driven with the unmodified OpenAI SDK: what a user meets on day one.

The gpu tier is the real server (one generation at a time, its default of interrupting a
running stream when another request arrives, no usage in streams); the cpu tier is the
simulator, so an answer that should have come from llama.cpp but did not is seen. The
server's facts are pinned in tests/test_llama_wire.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.deployment import Deployment, backend, deployment, tier
from tests.llama_server import ANSWER, ANSWER_TOKENS, MODEL_NAME, LlamaServer, running_llama
from tests.services import wait_until

pytestmark = pytest.mark.slow
N_CTX = 4096  # room for a long answer to kill mid-call
# Seconds of tokens (about 0.7 ms each, more as the context fills), in llama.cpp's own extra.
LONG = {"min_tokens": 4000, "max_tokens": 4000}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                       "required": ["zone"]},
    },
}  # fmt: skip
NAMED = {"type": "function", "function": {"name": "get_time"}}
ARGUMENTS = '{"zone":""}'  # the tiny model's shortest valid arguments


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    with running_llama(n_ctx=N_CTX) as started:
        yield started


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, server: LlamaServer) -> Iterator[Deployment]:
    def tiers(urls: dict[str, str]) -> dict[str, Any]:
        llama = backend(
            "llama", "openai", server.url, model=MODEL_NAME, dialect="llama.cpp",
            max_concurrency=1, read_timeout=30, health={"interval": 1.0},
        )  # fmt: skip
        return {
            "tiers": [
                tier("gpu", llama, breaker={"min_calls": 50}),
                tier("cpu", backend("cpu-sim", "openai", urls["cpu-sim"])),
            ],
            "on_exhausted": "fail",
        }

    folder = tmp_path_factory.mktemp("llama-tierq")
    with deployment(folder, config=tiers, simulators=("cpu-sim",)) as d:
        d.stack.api()
        d.stack.relay()  # its probes run throughout, against the busy single-slot server
        d.stack.worker("gpu")
        d.stack.worker("cpu")
        yield d


@pytest.fixture
def client(d: Deployment, server: LlamaServer) -> OpenAI:
    wait_until(lambda: _answers(server), 30, what="the llama server up")
    return OpenAI(base_url=f"{d.stack.api_url}/v1", api_key=d.key, max_retries=0, timeout=60)


def _answers(server: LlamaServer) -> bool:
    try:
        return httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def job(d: Deployment, job_id: str, wait: float = 30) -> dict[str, Any]:
    with d.client() as http:
        return http.get(f"/v1/jobs/{job_id}", params={"wait": wait}).json()


def ask(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_a_plain_answer_and_a_streamed_one(d: Deployment, client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="tierq", messages=ask())
    answer = raw.parse()
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert raw.headers["x-tierq-backend"] == "llama" and raw.headers["x-tierq-quality"] == "full"
    assert answer.usage is not None and answer.usage.completion_tokens == ANSWER_TOKENS

    stream = client.chat.completions.create(
        model="tierq", messages=ask(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # llama.cpp sends no usage in a stream: unknown, not zero, in the last chunk and stored.
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens is None
    stored = job(d, stream.response.headers["x-tierq-job-id"])
    assert stored["result"]["usage"]["prompt_tokens"] is None


def test_max_completion_tokens_holds_on_a_server_that_ignores_it(client: OpenAI) -> None:
    answer = client.chat.completions.create(model="tierq", messages=ask(), max_completion_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert answer.choices[0].finish_reason == "length"


def test_extra_body_reaches_the_server(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tierq", messages=ask(), extra_body={"min_tokens": 40, "max_tokens": 40}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 40  # not 12


def test_content_parts_reach_the_model(client: OpenAI) -> None:
    def prompt_tokens(text: str) -> int:
        parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": text}]
        answer = client.chat.completions.create(
            model="tierq", messages=[{"role": "user", "content": parts}]
        )
        assert answer.choices[0].message.content == ANSWER
        assert answer.usage is not None and answer.usage.prompt_tokens is not None
        return answer.usage.prompt_tokens

    # The model sees the parts' text (a token per byte): ChatML alone would drop it.
    assert prompt_tokens("a" * 50) - prompt_tokens("a") == 49


def test_a_tool_call_plain_and_streamed(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tierq", messages=ask(), tools=[TIME_TOOL], tool_choice=NAMED
    )
    [call] = answer.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_time", ARGUMENTS)
    assert answer.choices[0].finish_reason == "tool_calls"
    # llama.cpp repeats the call's id and name in every piece; the client gets them once.
    with client.chat.completions.stream(
        model="tierq", messages=ask(), tools=[TIME_TOOL], tool_choice=NAMED
    ) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls or []
    assert (streamed.function.name, streamed.function.arguments) == ("get_time", ARGUMENTS)


class Zone(BaseModel):
    zone: str


def test_structured_output_and_parse(client: OpenAI) -> None:
    schema = Zone.model_json_schema()
    answer = client.chat.completions.create(
        model="tierq",
        messages=ask(),
        response_format={"type": "json_schema", "json_schema": {"name": "z", "schema": schema}},
    )
    assert json.loads(answer.choices[0].message.content or "") == {"zone": ""}
    parsed = client.chat.completions.parse(model="tierq", messages=ask(), response_format=Zone)
    assert parsed.choices[0].message.parsed == Zone(zone="")


def test_a_conversation_with_a_tool_call_and_its_result(d: Deployment) -> None:
    with d.client() as http:
        conversation = http.post("/v1/conversations", json={"system": "Be brief."}).json()["id"]
        url = f"/v1/conversations/{conversation}/messages"
        asked = {"model": "tierq", "messages": ask(), "tools": [TIME_TOOL], "tool_choice": NAMED}
        first = job(d, http.post(url, json=asked).json()["id"])
        [call] = first["result"]["choices"][0]["message"]["tool_calls"]
        result = {"role": "tool", "tool_call_id": call["id"], "content": "12:00"}
        second = job(d, http.post(url, json={"model": "tierq", "messages": [result]}).json()["id"])
        turns = http.get(f"/v1/conversations/{conversation}").json()["turns"]
    # The assistant's tool call went back as context (llama.cpp refuses it with null
    # content): the server answered, not the fallback.
    assert second["status"] == "succeeded" and second["served_by"]["backend"] == "llama", second
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "tool", "assistant"]
    assert turns[2]["message"]["tool_calls"] == [call]
    assert turns[3]["message"]["tool_call_id"] == call["id"]


def test_a_context_overflow_fails_as_such_plain_and_streamed(d: Deployment, client: OpenAI) -> None:
    too_long = ask("a " * N_CTX)  # a token per byte: twice the context
    before = d.calls("cpu-sim")
    with pytest.raises(openai.BadRequestError) as plain:
        client.chat.completions.create(model="tierq", messages=too_long)
    assert plain.value.code == "context_length_exceeded"
    # Streamed, llama.cpp answers 200 and nothing; tierq finds out what it was.
    stream = client.chat.completions.create(model="tierq", messages=too_long, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    stored = job(d, stream.response.headers["x-tierq-job-id"])
    assert stored["status"] == "failed" and "context" in stored["error"], stored
    assert d.calls("cpu-sim") == before  # no other tier answered either


def test_a_server_killed_mid_call_loses_nothing(
    d: Deployment, client: OpenAI, server: LlamaServer
) -> None:
    with d.client() as http:
        job_id = http.post("/v1/jobs", json={"model": "tierq", "messages": ask(), **LONG}).json()[
            "id"
        ]
    wait_until(
        lambda: job(d, job_id, wait=0)["status"] == "running", 15, 0.02, what="the job claimed"
    )
    time.sleep(0.5)  # the call is made at once and lasts seconds: kill it midway
    server.kill()
    try:
        ended = job(d, job_id)
    finally:
        server.start()
    # Not stored as an answer from llama.cpp: the fallback tier answered it whole.
    assert ended["status"] == "succeeded", ended
    assert ended["served_by"]["backend"] == "cpu-sim", ended


def test_a_server_killed_mid_stream_loses_nothing(
    d: Deployment, client: OpenAI, server: LlamaServer
) -> None:
    stream = client.chat.completions.create(
        model="tierq", messages=ask(), stream=True, extra_body=LONG
    )
    pieces = iter(stream)
    shown = [next(pieces).choices[0].delta.content or "" for _ in range(3)]
    server.kill()
    try:
        with pytest.raises(openai.APIError) as cut:
            list(pieces)  # what was shown is void: the stream says so
        ended = job(d, stream.response.headers["x-tierq-job-id"])
    finally:
        server.start()
    assert "stream_reset" in str(cut.value.body) or "stream_reset" in str(cut.value)
    assert "".join(shown).strip()
    assert ended["status"] == "succeeded" and ended["served_by"]["backend"] == "cpu-sim", ended
    assert "[cpu-sim]" in ended["result"]["choices"][0]["message"]["content"]


def test_a_busy_server_under_probes_keeps_its_traffic(d: Deployment, client: OpenAI) -> None:
    """Eight clients at once, half streaming, on a server that answers one at a time and
    ends a stream when any other request arrives, while the relay probes it every second:
    every answer comes from llama.cpp, whole; none went to the fallback."""
    before = d.calls("cpu-sim")
    answers: dict[int, Any] = {}

    def one(i: int) -> None:
        body = {"model": "tierq", "messages": ask(f"client {i}"),
                "extra_body": {"min_tokens": 200, "max_tokens": 200}}  # fmt: skip
        if i % 2:
            chunks = list(client.chat.completions.create(**body, stream=True))
            answers[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                          chunks[-1].choices[0].finish_reason, chunks[-1].model_extra)  # fmt: skip
        else:
            answer = client.chat.completions.create(**body)
            answers[i] = (answer.choices[0].message.content, answer.choices[0].finish_reason,
                          answer.usage)  # fmt: skip

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 8, answers
    for i, (text, finish, _) in answers.items():
        assert finish == "length", (i, finish)
        assert text.startswith(ANSWER) and len(text.split()) >= 150, (i, text)
    assert d.calls("cpu-sim") == before, "a job went to the lower tier"
    print(f"8 jobs in {time.monotonic() - started:.1f}s")
