"""The backend clients against the real simulator, one protocol at a time, fault by fault.

The clients are asynchronous; the tests that share one connection pool run on one event
loop for the module (``run``), the others in ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from simulator.control import SimulatorControl
from simulator.server import bind
from tests.simulator_fixture import running_simulator
from tierq.config import BackendConfig
from worker.backends import (
    BackendClient,
    BackendError,
    ChatAnswer,
    ErrorClass,
    client_for,
)
from worker.backends.base import pool_limits

SIM = "sim-b"
PROTOCOLS = ["openai", "ollama", "anthropic"]
REQUEST = {
    "model": "ignored-the-backend-has-its-own",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello big world"},
    ],
    "temperature": 0.2,
}
ANSWER = f"[{SIM}] You said: hello big world"
SECRET = "sk-test-Zq8v2XXsecretXXkey"
KEY_ENV = "TIERQ_TEST_BACKEND_KEY"
LIVENESS = {
    "openai": "GET /v1/models",
    "ollama": "GET /api/version",
    "anthropic": "GET /v1/models",
}
CHAT_ENDPOINT = {
    "openai": "POST /v1/chat/completions",
    "ollama": "POST /api/chat",
    "anthropic": "POST /v1/messages",
}
T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with running_simulator(SIM) as url:
        yield url


@pytest.fixture(scope="module")
def admin(sim_url: str) -> Iterator[SimulatorControl]:
    with SimulatorControl(sim_url) as ctl:
        yield ctl


@pytest.fixture
def control(admin: SimulatorControl) -> SimulatorControl:
    """The simulator's admin client, with the simulator back to no faults and no counts."""
    admin.reset()
    return admin


@pytest.fixture(scope="module")
def run() -> Iterator[Run[Any]]:
    """Run a coroutine on the module's one event loop (a pool belongs to one loop)."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="module")
def shared_http(run: Run[Any]) -> Iterator[httpx.AsyncClient]:
    # One pool for the whole module, as a worker shares one; creating clients costs ~20 ms.
    http = httpx.AsyncClient()
    yield http
    run(http.aclose())


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_config(protocol: str, url: str, **overrides: Any) -> BackendConfig:
    fields: dict[str, Any] = {
        "name": f"b-{protocol}",
        "protocol": protocol,
        "url": url,
        "model": "m-1",
        "api_key_env": KEY_ENV,
        "connect_timeout": 1.0,
        "read_timeout": 5.0,
    }
    return BackendConfig(**(fields | overrides))


async def drain(
    client: BackendClient, request: dict[str, Any] = REQUEST, **options: Any
) -> tuple[list[str], ChatAnswer]:
    """Stream ``request``: the deltas in the order given, and the answer returned."""
    deltas: list[str] = []
    answer = await client.stream(request, on_delta=deltas.append, **options)
    return deltas, answer


async def call(client: BackendClient, how: str) -> ChatAnswer:
    if how == "chat":
        return await client.chat(REQUEST)
    return (await drain(client))[1]


# -- answers ----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_chat(protocol: str, sim_url: str, control: SimulatorControl) -> None:
    async def chat() -> ChatAnswer:
        async with client_for(make_config(protocol, sim_url)) as client:
            return await client.chat(REQUEST)

    answer = asyncio.run(chat())
    words = len(ANSWER.split())
    assert answer == ChatAnswer(ANSWER, "stop", 5, words, "m-1")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream(
    protocol: str,
    run: Run[Any],
    sim_url: str,
    control: SimulatorControl,
    shared_http: httpx.AsyncClient,
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    deltas, answer = run(drain(client))
    assert len(deltas) == len(ANSWER.split())  # the simulator streams one word per delta
    assert "".join(d["content"] for d in deltas) == ANSWER
    assert answer == ChatAnswer(ANSWER, "stop", 5, len(deltas), "m-1")


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_call_can_ask_for_another_model(
    protocol: str,
    how: str,
    run: Run[Any],
    sim_url: str,
    control: SimulatorControl,
    shared_http: httpx.AsyncClient,
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    if how == "chat":
        answer = run(client.chat(REQUEST, model="smaller-1"))
    else:
        answer = run(drain(client, model="smaller-1"))[1]
    assert answer.model == "smaller-1"  # the simulator answers as the model it was asked for
    assert run(call(client, how)).model == "m-1"  # the next call is back to the configured one


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_call_timeout_caps_the_backend_timeouts(
    protocol: str,
    how: str,
    run: Run[Any],
    sim_url: str,
    control: SimulatorControl,
    shared_http: httpx.AsyncClient,
) -> None:
    control.set_faults(mode="hang")
    client = client_for(make_config(protocol, sim_url, read_timeout=5), http=shared_http)
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        if how == "chat":
            run(client.chat(REQUEST, timeout=0.3))
        else:
            run(drain(client, timeout=0.3))
    assert caught.value.error_class is ErrorClass.TIMEOUT
    assert "after 0.3s" in caught.value.message
    assert time.monotonic() - started < 2.5  # far below the configured 5 s


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_max_tokens_means_length(
    protocol: str,
    how: str,
    run: Run[Any],
    sim_url: str,
    control: SimulatorControl,
    shared_http: httpx.AsyncClient,
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    request = REQUEST | {"max_tokens": 2}
    answer = run(client.chat(request)) if how == "chat" else run(drain(client, request))[1]
    assert (answer.content, answer.finish_reason, answer.completion_tokens) == (
        f"[{SIM}] You",
        "length",
        2,
    )


def test_stopping_a_stream_early_is_clean(sim_url: str, control: SimulatorControl) -> None:
    control.set_faults(tokens_per_second=20)

    async def first_delta_then_chat() -> tuple[list[str], str]:
        async with client_for(make_config("anthropic", sim_url)) as client:
            deltas: list[str] = []
            first = asyncio.Event()

            def on_delta(text: str) -> None:
                deltas.append(text)
                first.set()

            streaming = asyncio.create_task(client.stream(REQUEST, on_delta=on_delta))
            await first.wait()
            streaming.cancel()
            with pytest.raises(asyncio.CancelledError):
                await streaming
            control.set_faults()
            return deltas, (await client.chat(REQUEST)).content  # the pool is still usable

    deltas, content = asyncio.run(first_delta_then_chat())
    assert deltas == [{"content": f"[{SIM}] "}]
    assert content == ANSWER


# -- cancelling a call: the server sees its client go -----------------------------------
async def _stats_within(control: SimulatorControl, seconds: float) -> dict[str, Any]:
    """The simulator's stats once it has seen an abort and nothing is left in flight."""
    deadline = time.monotonic() + seconds
    while True:
        await asyncio.sleep(0.02)  # the loop runs on: the cancelled call's socket closes
        stats = control.stats()
        if (stats["aborted"], stats["in_flight"]) == (1, 0) or time.monotonic() > deadline:
            return stats


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cancelling_a_call_closes_its_connection(
    protocol: str,
    how: str,
    run: Run[Any],
    sim_url: str,
    control: SimulatorControl,
    shared_http: httpx.AsyncClient,
) -> None:
    # A slow answer: 5 s before a plain one starts; a stream with a word every 0.2 s.
    control.set_faults(**({"latency_ms": 5000} if how == "chat" else {"tokens_per_second": 5}))
    client = client_for(make_config(protocol, sim_url, read_timeout=10), http=shared_http)
    deltas: list[str] = []

    async def cancel_after(seconds: float) -> tuple[float, dict[str, Any]]:
        if how == "chat":
            calling = asyncio.create_task(client.chat(REQUEST))
        else:
            calling = asyncio.create_task(client.stream(REQUEST, on_delta=deltas.append))
        await asyncio.sleep(seconds)
        assert control.stats()["in_flight"] == 1
        cancelled_at = time.monotonic()
        calling.cancel()
        with pytest.raises(asyncio.CancelledError):  # not a BackendError, not swallowed
            await calling
        stats = await _stats_within(control, 1.0)
        return time.monotonic() - cancelled_at, stats

    took, stats = run(cancel_after(0.3))
    assert (stats["aborted"], stats["in_flight"]) == (1, 0), stats
    assert took < 1.0
    assert stats["endpoints"] == {CHAT_ENDPOINT[protocol]: 1}
    if how == "stream":
        assert 0 < len(deltas) < len(ANSWER.split())  # cut off mid-answer
    control.set_faults()
    assert run(call(client, how)).content == ANSWER  # the shared pool is still usable


# -- faults -----------------------------------------------------------------------------
FAULTS: list[tuple[dict[str, Any], ErrorClass]] = [
    ({"mode": "error_500"}, ErrorClass.SERVER),
    ({"mode": "overloaded"}, ErrorClass.OVERLOADED),
    ({"mode": "rate_limit", "retry_after": 2.5}, ErrorClass.RATE_LIMITED),
    ({"mode": "reset"}, ErrorClass.CONNECT),
    ({"mode": "hang"}, ErrorClass.TIMEOUT),
    ({"mode": "malformed"}, ErrorClass.MALFORMED),
    ({"mode": "wrong_shape"}, ErrorClass.MALFORMED),
    ({"mode": "context_length"}, ErrorClass.CONTEXT_LENGTH),
    ({"max_context_words": 3}, ErrorClass.CONTEXT_LENGTH),
]
STATUS = {
    ErrorClass.SERVER: {"openai": 500, "ollama": 500, "anthropic": 500},
    ErrorClass.OVERLOADED: {"openai": 503, "ollama": 503, "anthropic": 529},
    ErrorClass.RATE_LIMITED: {p: 429 for p in PROTOCOLS},
    ErrorClass.CONTEXT_LENGTH: {p: 400 for p in PROTOCOLS},
    ErrorClass.MALFORMED: {p: 200 for p in PROTOCOLS},
}


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize(("faults", "expected"), FAULTS, ids=[str(f) for f, _ in FAULTS])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fault_is_classified(
    protocol: str,
    faults: dict[str, Any],
    expected: ErrorClass,
    how: str,
    sim_url: str,
    control: SimulatorControl,
    run: Run[Any],
    shared_http: httpx.AsyncClient,
) -> None:
    control.set_faults(**faults)
    client = client_for(make_config(protocol, sim_url, read_timeout=0.2), http=shared_http)
    with pytest.raises(BackendError) as caught:
        run(call(client, how))
    error = caught.value
    assert error.error_class is expected
    assert error.retryable is (expected not in (ErrorClass.CONTEXT_LENGTH, ErrorClass.CLIENT))
    assert error.status == STATUS.get(expected, {}).get(protocol)
    assert error.message.startswith(f"b-{protocol}: ")
    if expected is ErrorClass.RATE_LIMITED:
        assert error.retry_after == 2.5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_closed_port_is_connect(protocol: str) -> None:
    sock = bind("127.0.0.1", 0)  # bound but never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def calls() -> None:
        async with client_for(make_config(protocol, url)) as client:
            with pytest.raises(BackendError) as caught:
                await client.chat(REQUEST)
            assert caught.value.error_class is ErrorClass.CONNECT
            with pytest.raises(BackendError) as caught:
                await drain(client)
            assert caught.value.error_class is ErrorClass.CONNECT
            assert await client.live() is False

    try:
        asyncio.run(calls())
    finally:
        sock.close()


def test_shared_pool_still_uses_the_backend_timeouts(
    sim_url: str, control: SimulatorControl
) -> None:
    control.set_faults(mode="hang")

    async def hanging_call() -> BackendError:
        async with httpx.AsyncClient(timeout=30) as shared:
            client = client_for(make_config("openai", sim_url, read_timeout=0.2), http=shared)
            with pytest.raises(BackendError) as caught:
                await client.chat(REQUEST)
            await client.aclose()  # a borrowed pool is left open for its owner
            assert not shared.is_closed
        return caught.value

    error = asyncio.run(hanging_call())
    assert error.error_class is ErrorClass.TIMEOUT
    assert "read timeout after 0.2s" in error.message


def test_an_own_pool_does_not_cap_concurrency() -> None:
    config = make_config("openai", "http://vllm:8000", max_concurrency=1000)
    limits = pool_limits(config)
    assert limits.max_connections is None
    assert limits.max_keepalive_connections == 1000
    assert pool_limits(make_config("openai", "http://vllm:8000")).max_keepalive_connections == 256

    async def owned_pool_closes() -> bool:
        client = client_for(config)
        await client.aclose()  # its own pool is closed with it
        return client._http.is_closed

    assert asyncio.run(owned_pool_closes())


# -- liveness ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_live(
    protocol: str,
    run: Run[Any],
    sim_url: str,
    control: SimulatorControl,
    shared_http: httpx.AsyncClient,
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    assert run(client.live()) is True
    assert control.stats()["endpoints"] == {LIVENESS[protocol]: 1}
    control.set_faults(mode="error_500", scope="chat")
    assert run(client.live()) is True  # the server is up; only inference fails
    control.set_faults(mode="overloaded")
    assert run(client.live()) is False
    with pytest.raises(BackendError) as caught:
        run(client.check_live())
    assert caught.value.error_class is ErrorClass.OVERLOADED


# -- secrets ----------------------------------------------------------------------------
def test_api_key_not_in_transport_errors(sim_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="reset")

    async def chat() -> ChatAnswer:
        async with client_for(make_config("anthropic", sim_url)) as client:
            return await client.chat(REQUEST)

    with pytest.raises(BackendError) as c:
        asyncio.run(chat())
    assert c.value.error_class is ErrorClass.CONNECT
    assert SECRET not in "".join(traceback.format_exception(c.value))
