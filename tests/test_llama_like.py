"""What llama.cpp taught, through the simulator's llama knobs (``slots``, ``interrupt_streams``,
``overflow_stream``): fast, with no real server. tests/test_llama_tierq.py shows the same
against the real one; tests/test_simulator.py checks the knobs against its wire facts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.deployment import Deployment, backend, deployment, tier
from tests.test_failover import sim

pytestmark = pytest.mark.slow
LLAMA_LIKE = {"slots": 1, "interrupt_streams": True, "tokens_per_second": 60}


def two_tiers(urls: dict[str, str]) -> dict[str, Any]:
    # Two calls at once to a server that serves one: the second interrupts the first's
    # stream, as any request does on llama.cpp (a probe, another worker, another tierq).
    llama = backend("gpu-sim", "openai", urls["gpu-sim"], max_concurrency=2)
    return {
        "tiers": [
            tier("gpu", llama, retry={"attempts": 5, "base_delay": 0.05, "budget": 1.0},
                 breaker={"min_calls": 50}),
            tier("cpu", backend("cpu-sim", "openai", urls["cpu-sim"])),
        ],
        "on_exhausted": "fail",
    }  # fmt: skip


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("llama-like")
    with deployment(folder, config=two_tiers, simulators=("gpu-sim", "cpu-sim")) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        d.stack.worker("cpu")
        yield d


@pytest.fixture
def client(d: Deployment) -> Iterator[OpenAI]:
    for name in d.simulators:
        with sim(d, name) as control:
            control.reset()
            control.reset_stats()
    yield OpenAI(base_url=f"{d.stack.api_url}/v1", api_key=d.key, max_retries=0, timeout=60)


def job(d: Deployment, job_id: str) -> dict[str, Any]:
    with d.client() as http:
        return http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()


def test_a_stream_the_server_interrupts_is_never_stored_as_an_answer(
    d: Deployment, client: OpenAI
) -> None:
    d.fault("gpu-sim", **LLAMA_LIKE)
    words = " ".join(f"w{i}" for i in range(30))
    ids: dict[int, str] = {}
    errors: list[BaseException] = []

    def chat(i: int) -> None:
        stream = client.chat.completions.create(
            model="tierq", messages=[{"role": "user", "content": f"{i} {words}"}], stream=True
        )
        ids[i] = stream.response.headers["x-tierq-job-id"]
        try:
            list(stream)
        except openai.APIError as error:  # a stream_reset: what was shown is void
            errors.append(error)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sim(d, "gpu-sim").stats()["interrupted"] >= 1, "no stream was interrupted"
    for i, job_id in ids.items():
        ended = job(d, job_id)
        assert ended["status"] == "succeeded", ended
        backend = ended["served_by"]["backend"]
        # Whole: the answer echoes every word of its question, never a cut prefix.
        full = f"[{backend}] You said: {i} {words}"
        assert ended["result"]["choices"][0]["message"]["content"] == full, ended
    assert all(getattr(e, "code", None) == "stream_reset" for e in errors), errors


def test_a_streamed_overflow_is_a_context_error_not_a_reason_to_move_on(
    d: Deployment, client: OpenAI
) -> None:
    d.fault("gpu-sim", overflow_stream="empty", max_context_words=5)
    stream = client.chat.completions.create(
        model="tierq",
        messages=[{"role": "user", "content": "far too many words for this small model"}],
        stream=True,
    )
    with pytest.raises(openai.APIError):
        list(stream)
    ended = job(d, stream.response.headers["x-tierq-job-id"])
    assert ended["status"] == "failed" and "context" in ended["error"], ended
    assert sim(d, "cpu-sim").stats()["total"] == 0  # the other tier was not asked
