"""The official OpenAI SDK, unmodified, against a real tierq (API, relay, worker processes).

What the SDK does that matters here (openai 3.x, ``_base_client.py``): it retries 408,
409, 429 and 5xx twice by default, honouring ``Retry-After`` up to 120 s and an
``x-should-retry`` header above all; it sends ``x-stainless-read-timeout`` and
``x-stainless-retry-count``, but no ``Idempotency-Key`` of its own, so only a key the
caller passes with ``extra_headers`` makes its retries safe.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.deployment import Deployment, backend, deployment, tier

pytestmark = pytest.mark.slow


def text_delta(text: str) -> dict[str, str]:
    """A worker's stream entry carrying text, as tierq.streams writes it."""
    return {"kind": "delta", "delta": json.dumps({"content": text})}


QUESTION = [{"role": "user", "content": "what is durable?"}]


def sdk(d: Deployment, **options: Any) -> OpenAI:
    return OpenAI(base_url=f"{d.stack.api_url}/v1", api_key=d.key, **options)


def counting_sdk(d: Deployment, **options: Any) -> tuple[OpenAI, list[httpx.Request]]:
    """An SDK client whose HTTP requests (retries included) are recorded."""
    sent: list[Any] = []
    http = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    return sdk(d, http_client=http, **options), sent


def chat_calls(d: Deployment, simulator: str = "gpu-sim") -> int:
    stats = httpx.get(f"{d.simulators[simulator]}/_sim/stats").json()
    return stats["endpoints"].get("POST /v1/chat/completions", 0)


def job_count(d: Deployment) -> int:
    with d.client() as client:
        return len(client.get("/v1/jobs", params={"limit": 100}).json()["data"])


def wait_job(d: Deployment, job_id: str, wait: float = 20) -> dict[str, Any]:
    with d.client() as client:
        return client.get(f"/v1/jobs/{job_id}", params={"wait": wait}).json()


def event_kinds(d: Deployment, job_id: str) -> list[str]:
    from sqlalchemy import select

    from tierq.db import make_engine
    from tierq.models import JobEvent

    engine = make_engine(d.database_url)
    try:
        with engine.connect() as conn:
            query = select(JobEvent.kind).where(JobEvent.job_id == uuid.UUID(job_id))
            return list(conn.scalars(query.order_by(JobEvent.id)))
    finally:
        engine.dispose()


@pytest.fixture
def pg_redis(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path) as d:
        yield d


def gpu_only(urls: dict[str, str]) -> dict[str, Any]:
    return {"tiers": [tier("gpu", backend("gpu-sim", "openai", urls["gpu-sim"]))]}


@pytest.mark.parametrize("mode", ["postgres-redis", "sqlite-filesystem"])
def test_sdk_completes_a_chat_and_lists_models(tmp_path: Path, mode: str) -> None:
    with deployment(tmp_path, mode) as d:
        sdk_completes_a_chat_and_lists_models(d)


def sdk_completes_a_chat_and_lists_models(d: Deployment) -> None:
    d.stack.api()
    d.stack.relay()
    d.stack.worker("gpu")
    client = sdk(d)

    models = [m.id for m in client.models.list()]
    assert models[0] == "tierq"
    assert {"gpu-sim-model", "cpu-sim-model"} <= set(models)

    raw = client.chat.completions.with_raw_response.create(
        model="tierq", messages=QUESTION, n=1, temperature=0.2
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    answer = completion.choices[0].message.content or ""
    assert "what is durable?" in answer and "gpu-sim" in answer
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    job_id = raw.headers["x-tierq-job-id"]
    assert completion._request_id == job_id  # x-request-id: the SDK shows the job id
    assert raw.headers["x-tierq-tier"] == "gpu"
    assert raw.headers["x-tierq-backend"] == "gpu-sim"
    assert raw.headers["x-tierq-quality"] == "full"
    assert raw.headers["x-tierq-attempts"] == "1"
    job = wait_job(d, job_id)
    assert job["status"] == "succeeded" and job["result"]["id"] == completion.id
    assert chat_calls(d) == 1

    # Bad input: a 4xx naming the field, no job written, nothing run.
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model="tierq", messages=QUESTION, n=0)
    assert bad.value.param == "n" and "greater than or equal to 1" in str(bad.value)
    with pytest.raises(openai.UnprocessableEntityError) as bad_bias:
        client.chat.completions.create(model="tierq", messages=QUESTION, logit_bias={"x": 2})
    assert bad_bias.value.param == "logit_bias.x"
    with pytest.raises(openai.AuthenticationError) as denied:
        OpenAI(base_url=f"{d.stack.api_url}/v1", api_key="tq_wrong").models.list()
    assert "not valid" in str(denied.value)
    assert job_count(d) == 1 and chat_calls(d) == 1


def test_wait_runs_out_then_the_same_key_returns_the_answer(pg_redis: Deployment) -> None:
    d = pg_redis
    d.stack.api(TIERQ_CHAT_WAIT_SECONDS="1")
    d.stack.relay()
    d.stack.worker("gpu")
    d.fault("gpu-sim", latency_ms=3000)
    key = {"Idempotency-Key": f"chat-{uuid.uuid4()}"}

    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as ran_out:
        sdk(d, max_retries=0).chat.completions.create(
            model="tierq", messages=QUESTION, extra_headers=key
        )
    assert time.monotonic() - started < 2.5
    error = ran_out.value
    job_id = error.body["job_id"]  # type: ignore[index]
    assert error.status_code == 504 and error.code == "job_not_finished"
    assert job_id in str(error) and "Idempotency-Key" in str(error)
    assert error.request_id == job_id
    assert error.response.headers["location"] == f"/v1/jobs/{job_id}"
    assert error.response.headers["retry-after"] == "1"
    assert error.response.headers["x-should-retry"] == "true"

    assert wait_job(d, job_id)["status"] == "succeeded"
    assert chat_calls(d) == 1
    raw = sdk(d).chat.completions.with_raw_response.create(
        model="tierq", messages=QUESTION, extra_headers=key
    )
    assert raw.headers["x-tierq-job-id"] == job_id
    assert raw.headers["idempotent-replayed"] == "true"
    assert "what is durable?" in (raw.parse().choices[0].message.content or "")
    assert chat_calls(d) == 1 and job_count(d) == 1  # answered from the job, not run again

    # With a key, the SDK's own retries wait for the same job until it answers.
    client, sent = counting_sdk(d, max_retries=4)
    d.fault("gpu-sim", latency_ms=2500)
    completion = client.chat.completions.create(
        model="tierq",
        messages=QUESTION,
        extra_headers={"Idempotency-Key": f"chat-{uuid.uuid4()}"},
    )
    assert "what is durable?" in (completion.choices[0].message.content or "")
    assert len(sent) >= 2 and len({r.headers["idempotency-key"] for r in sent}) == 1
    assert chat_calls(d) == 2 and job_count(d) == 2

    # Without a key, a retry would run the request again: tierq tells the SDK not to.
    client, sent = counting_sdk(d)  # the SDK's default: two retries
    with pytest.raises(openai.InternalServerError) as unkeyed:
        client.chat.completions.create(model="tierq", messages=QUESTION)
    assert len(sent) == 1 and "idempotency-key" not in sent[0].headers
    assert unkeyed.value.response.headers["x-should-retry"] == "false"
    assert f"GET /v1/jobs/{unkeyed.value.body['job_id']}" in str(unkeyed.value)  # type: ignore[index]
    assert job_count(d) == 3
    assert wait_job(d, unkeyed.value.body["job_id"])["status"] == "succeeded"  # type: ignore[index]
    assert chat_calls(d) == 3


def test_failed_parked_and_cancelled_jobs_are_openai_errors(tmp_path: Path) -> None:
    with deployment(tmp_path, config=gpu_only, simulators=("gpu-sim",)) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        client, sent = counting_sdk(d)

        # The backend refuses the request as too long: a 400 like OpenAI's own.
        d.fault("gpu-sim", mode="context_length")
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model="tierq", messages=QUESTION)
        assert too_long.value.code == "context_length_exceeded"
        assert too_long.value.body["job_id"] in str(too_long.value)  # type: ignore[index]
        assert len(sent) == 1 and chat_calls(d) == 1

        # Every backend down: the job is parked, the client told so at once, with when.
        d.fault("gpu-sim", mode="error_500")
        sent.clear()
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as parked:
            client.with_options(max_retries=0).chat.completions.create(
                model="tierq",
                messages=QUESTION,
                extra_headers={"Idempotency-Key": f"parked-{uuid.uuid4()}"},
            )
        assert time.monotonic() - started < 20
        assert parked.value.status_code == 503 and parked.value.code == "job_parked"
        assert "parked" in str(parked.value)
        assert 1 <= int(parked.value.response.headers["retry-after"]) <= 60
        # It was parked (the relay may already be replaying it: the log says what happened).
        assert "parked" in event_kinds(d, parked.value.body["job_id"])  # type: ignore[index]

        # A cancelled job stays cancelled: the same key gets a 409 the SDK does not retry.
        # The SDK's read timeout (2 s) caps tierq's wait, so the 504 comes before it gives up.
        d.fault("gpu-sim", mode="ok", latency_ms=4000)
        key = {"Idempotency-Key": f"cancel-{uuid.uuid4()}"}
        with pytest.raises(openai.InternalServerError) as slow:
            client.with_options(max_retries=0, timeout=2).chat.completions.create(
                model="tierq", messages=QUESTION, extra_headers=key
            )
        job_id = slow.value.body["job_id"]  # type: ignore[index]
        with d.client() as http:
            assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        sent.clear()
        with pytest.raises(openai.ConflictError) as cancelled:
            client.chat.completions.create(model="tierq", messages=QUESTION, extra_headers=key)
        assert cancelled.value.code == "job_cancelled" and job_id in str(cancelled.value)
        assert len(sent) == 1


def read_stream(stream: Any, started: float) -> tuple[list[str], list[float], Any, Any, Any]:
    """Text pieces, their arrival times, usage, finish_reason and the tierq field."""
    pieces, arrivals, usage, finish, tierq = [], [], None, None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                arrivals.append(time.monotonic() - started)
            if choice.finish_reason:
                finish, tierq = choice.finish_reason, getattr(chunk, "tierq", None)
    return pieces, arrivals, usage, finish, tierq


@pytest.mark.parametrize("mode", ["postgres-redis", "sqlite-filesystem"])
def test_streaming_through_tierq_with_the_openai_sdk(tmp_path: Path, mode: str) -> None:
    """Tokens arrive as the backend makes them (Redis), or as one chunk (zero-install);
    either way the streamed answer is persisted like any other, says where it came from,
    and a repeat with the same Idempotency-Key streams that answer without running again."""
    with deployment(tmp_path, mode) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        d.fault("gpu-sim", tokens_per_second=20)
        client = OpenAI(base_url=f"{d.stack.api_url}/v1", api_key=d.key, max_retries=0)
        question = [{"role": "user", "content": "please stream a few words back to me"}]
        key = {"Idempotency-Key": f"stream-{uuid.uuid4()}"}
        started = time.monotonic()
        stream = client.chat.completions.create(
            model="tierq",
            messages=question,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=key,
        )
        pieces, arrivals, usage, finish, tierq = read_stream(stream, started)
        text = "".join(pieces)
        assert "please stream a few words back to me" in text and finish == "stop"
        assert usage is not None and usage.completion_tokens > 0
        job_id = stream.response.headers["x-tierq-job-id"]
        job = wait_job(d, job_id)
        assert job["status"] == "succeeded"
        assert job["result"]["choices"][0]["message"]["content"] == text
        assert tierq == {"job_id": job_id, "served_by": job["served_by"]}
        assert tierq["served_by"]["backend"] == "gpu-sim"
        assert tierq["served_by"]["quality"] == "full"
        if mode == "postgres-redis":
            assert len(pieces) > 5  # token by token ...
            assert arrivals[-1] - arrivals[0] > 0.2  # ... as they were produced
        else:
            assert len(pieces) == 1  # no live view without Redis: the whole answer at once

        again = client.chat.completions.create(
            model="tierq", messages=question, stream=True, extra_headers=key
        )
        repeat, _, _, finish, tierq = read_stream(again, time.monotonic())
        assert again.response.headers["x-tierq-job-id"] == job_id
        assert "".join(repeat) == text and finish == "stop"
        assert tierq == {"job_id": job_id, "served_by": job["served_by"]}
        assert chat_calls(d) == 1 and job_count(d) == 1  # answered from the job


def test_a_stream_that_waits_too_long_keeps_alive_then_names_the_job(
    pg_redis: Deployment,
) -> None:
    from api.routes.chat_stream import KEEPALIVE_SECONDS

    d = pg_redis
    wait = KEEPALIVE_SECONDS + 1.5  # long enough for one keepalive
    d.stack.api(TIERQ_CHAT_WAIT_SECONDS=str(wait))
    d.stack.relay()
    d.stack.worker("gpu")
    d.fault("gpu-sim", latency_ms=(wait + 15) * 1000)
    body = {"model": "tierq", "messages": QUESTION, "stream": True}
    headers = {"Authorization": f"Bearer {d.key}", "Idempotency-Key": str(uuid.uuid4())}

    started, lines = time.monotonic(), []
    url = f"{d.stack.api_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        job_id = response.headers["x-tierq-job-id"]
        lines = [line for line in response.iter_lines() if line]
    elapsed = time.monotonic() - started
    assert lines.count(": keepalive") >= 1
    errors = sse_payloads("\n".join(lines))
    assert len(errors) == 1 and errors[0]["error"]["code"] == "job_not_finished"
    assert errors[0]["error"]["job_id"] == job_id and "Idempotency-Key" in lines[-1]
    # The wait, plus at most one blocking stream read and scheduling noise.
    assert wait <= elapsed < wait + 5

    # The official SDK raises it as an error whose body names the job.
    client = sdk(d, max_retries=0)
    stream = client.chat.completions.create(
        model="tierq", messages=QUESTION, stream=True, extra_headers={"Idempotency-Key": "k2"}
    )
    with pytest.raises(openai.APIError) as ran_out:
        list(stream)
    assert ran_out.value.body["code"] == "job_not_finished"  # type: ignore[index]
    assert stream.response.headers["x-tierq-job-id"] in str(ran_out.value)


# --- the live view against a job whose worker the test plays, at exact moments -----------


def sse_payloads(body: str) -> list[Any]:
    """The data of each event; keepalive comments are not events."""
    import json

    return [
        json.loads(line.removeprefix("data: "))
        for line in body.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def streamed_text(payloads: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for payload in payloads
        for choice in payload.get("choices", [])
    )


def stored_answer(text: str) -> dict[str, Any]:
    """The job columns a worker's answer writes (worker.runner.completion's shape)."""
    result = {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    return {"result": result, "backend": "gpu-sim", "model": "m-1", "quality": "full"}


@pytest.fixture
def in_process(env: dict[str, str], api_key: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """The API in this process, on the test Postgres and Redis; no worker runs."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app()) as client:
        yield client, {"Authorization": f"Bearer {api_key}", "Idempotency-Key": str(uuid.uuid4())}


def queued_job(client: Any, headers: dict[str, str]) -> str:
    """The job the streamed chat below becomes (the same key and body: the same job)."""
    response = client.post(
        "/v1/jobs", json={"model": "tierq", "messages": QUESTION}, headers=headers
    )
    assert response.status_code == 202
    return response.json()["id"]


def stream_chat(client: Any, headers: dict[str, str]) -> list[Any]:
    body = {"model": "tierq", "messages": QUESTION, "stream": True}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    return sse_payloads(response.text)


@pytest.mark.parametrize("lost_in_redis", [False, True])
def test_the_last_deltas_reach_the_client_when_the_commit_follows_them_at_once(
    in_process: tuple[Any, dict[str, str]], redis_server: Any, lost_in_redis: bool
) -> None:
    """The worker writes its last deltas and commits between the reader's stream read and
    its job read: the client still gets every word (from the stream, or if a delta never
    made it into Redis, from the stored answer)."""
    from tests.test_api import LOAD_JOB, end_job, on_statement

    client, headers = in_process
    job_id = queued_job(client, headers)
    redis = redis_server.client()
    redis.xadd(f"tierq:stream:{job_id}", text_delta("Hello"))

    def last_words_then_commit() -> None:
        if not lost_in_redis:
            redis.xadd(f"tierq:stream:{job_id}", text_delta(", world"))
        end_job(job_id, stored_answer("Hello, world"), backend="gpu-sim")

    with on_statement(LOAD_JOB, last_words_then_commit, when="before") as fired:
        payloads = stream_chat(client, headers)
    assert fired.is_set()
    assert streamed_text(payloads) == "Hello, world"
    final = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert final[-1]["tierq"] == {
        "job_id": job_id,
        "served_by": {
            "tier": "gpu",
            "backend": "gpu-sim",
            "model": "m-1",
            "quality": "full",
            "attempts": 0,
        },
    }


def test_a_retry_after_a_stream_reset_gets_the_answer_not_the_same_reset(
    in_process: tuple[Any, dict[str, str]], redis_server: Any
) -> None:
    from tests.test_api import LOAD_JOB, end_job, on_statement

    client, headers = in_process
    job_id = queued_job(client, headers)
    redis, stream = redis_server.client(), f"tierq:stream:{job_id}"
    redis.xadd(stream, text_delta("a failed attempt's"))

    # The attempt fails after the client was shown its text: an error naming the job.
    attempt_fails = lambda: redis.xadd(stream, {"kind": "reset"})  # noqa: E731
    with on_statement(LOAD_JOB, attempt_fails, when="before"):
        first = stream_chat(client, headers)
    assert streamed_text(first) == "a failed attempt's"
    assert first[-1]["error"]["code"] == "stream_reset" and job_id in first[-1]["error"]["message"]

    # The retry with the same key follows the next attempt, from after the reset.
    def next_attempt_answers() -> None:
        redis.xadd(stream, text_delta("the answer"))
        end_job(job_id, stored_answer("the answer"), backend="gpu-sim")

    with on_statement(LOAD_JOB, next_attempt_answers, when="before") as fired:
        retried = stream_chat(client, headers)
    assert fired.is_set()
    assert streamed_text(retried) == "the answer" and "error" not in retried[-1]

    # Once the job has ended, the same key streams its whole stored answer.
    again = stream_chat(client, headers)
    assert streamed_text(again) == "the answer"
    assert again[-1]["tierq"]["served_by"]["backend"] == "gpu-sim"


def degraded_cpu(urls: dict[str, str]) -> dict[str, Any]:
    notice = {"degrade": {"notice": "[answered by the CPU fallback]"}}
    return {
        "tiers": [
            tier("gpu", backend("gpu-sim", "openai", urls["gpu-sim"])),
            tier("cpu", backend("cpu-sim", "ollama", urls["cpu-sim"]), **notice),
        ]
    }


def test_a_degraded_stream_carries_the_notice_the_stored_answer_starts_with(
    tmp_path: Path,
) -> None:
    with deployment(tmp_path, config=degraded_cpu) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        d.stack.worker("cpu")
        d.fault("gpu-sim", mode="error_500")
        client = OpenAI(base_url=f"{d.stack.api_url}/v1", api_key=d.key, max_retries=0)
        stream = client.chat.completions.create(model="tierq", messages=QUESTION, stream=True)
        pieces, _, _, finish, tierq = read_stream(stream, time.monotonic())
        text = "".join(pieces)
        job = wait_job(d, stream.response.headers["x-tierq-job-id"])
        assert finish == "stop" and job["status"] == "succeeded"
        assert text.startswith("[answered by the CPU fallback]\n\n")
        assert job["result"]["choices"][0]["message"]["content"] == text
        assert tierq["served_by"]["tier"] == "cpu"
        assert tierq["served_by"]["quality"] == "reduced"
