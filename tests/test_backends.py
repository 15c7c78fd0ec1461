"""The backend clients against the real simulator, one protocol at a time, fault by fault."""

from __future__ import annotations

import json
import pickle
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from simulator.control import SimulatorControl
from simulator.server import bind
from tests.simulator_fixture import running_simulator
from tierq.config import BackendConfig
from worker.backends import (
    AnthropicClient,
    BackendClient,
    BackendError,
    ChatAnswer,
    ErrorClass,
    OllamaClient,
    OpenAIClient,
    client_for,
    parse_retry_after,
)

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
def shared_http() -> Iterator[httpx.Client]:
    # One pool for the whole module, as a worker shares one; creating clients costs ~20 ms.
    with httpx.Client() as http:
        yield http


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


def drain(stream: Generator[str, None, ChatAnswer]) -> tuple[list[str], ChatAnswer]:
    deltas = []
    while True:
        try:
            deltas.append(next(stream))
        except StopIteration as stop:
            return deltas, stop.value


def call(client: BackendClient, how: str) -> ChatAnswer:
    if how == "chat":
        return client.chat(REQUEST)
    return drain(client.stream(REQUEST))[1]


# -- answers ----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_chat(protocol: str, sim_url: str, control: SimulatorControl) -> None:
    with client_for(make_config(protocol, sim_url)) as client:
        answer = client.chat(REQUEST)
    words = len(ANSWER.split())
    assert answer == ChatAnswer(ANSWER, "stop", 5, words, "m-1")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream(
    protocol: str, sim_url: str, control: SimulatorControl, shared_http: httpx.Client
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    deltas, answer = drain(client.stream(REQUEST))
    assert len(deltas) == len(ANSWER.split())  # the simulator streams one word per delta
    assert "".join(deltas) == ANSWER
    assert answer == ChatAnswer(ANSWER, "stop", 5, len(deltas), "m-1")


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_call_can_ask_for_another_model(
    protocol: str, how: str, sim_url: str, control: SimulatorControl, shared_http: httpx.Client
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    if how == "chat":
        answer = client.chat(REQUEST, model="smaller-1")
    else:
        answer = drain(client.stream(REQUEST, model="smaller-1"))[1]
    assert answer.model == "smaller-1"  # the simulator answers as the model it was asked for
    assert call(client, how).model == "m-1"  # the next call is back to the configured one


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_call_timeout_caps_the_backend_timeouts(
    protocol: str, how: str, sim_url: str, control: SimulatorControl, shared_http: httpx.Client
) -> None:
    control.set_faults(mode="hang")
    client = client_for(make_config(protocol, sim_url, read_timeout=5), http=shared_http)
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        if how == "chat":
            client.chat(REQUEST, timeout=0.3)
        else:
            drain(client.stream(REQUEST, timeout=0.3))
    assert caught.value.error_class is ErrorClass.TIMEOUT
    assert "after 0.3s" in caught.value.message
    assert time.monotonic() - started < 2.5  # far below the configured 5 s


@pytest.mark.parametrize("how", ["chat", "stream"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_max_tokens_means_length(
    protocol: str, how: str, sim_url: str, control: SimulatorControl, shared_http: httpx.Client
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    request = REQUEST | {"max_tokens": 2}
    answer = client.chat(request) if how == "chat" else drain(client.stream(request))[1]
    assert (answer.content, answer.finish_reason, answer.completion_tokens) == (
        f"[{SIM}] You",
        "length",
        2,
    )


def test_closing_a_stream_early_is_clean(sim_url: str, control: SimulatorControl) -> None:
    with client_for(make_config("anthropic", sim_url)) as client:
        stream = client.stream(REQUEST)
        assert next(stream) == f"[{SIM}] "
        stream.close()
        assert client.chat(REQUEST).content == ANSWER  # the pool is still usable


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
    shared_http: httpx.Client,
) -> None:
    control.set_faults(**faults)
    client = client_for(make_config(protocol, sim_url, read_timeout=0.2), http=shared_http)
    with pytest.raises(BackendError) as caught:
        call(client, how)
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
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with client_for(make_config(protocol, url)) as client:
            with pytest.raises(BackendError) as caught:
                client.chat(REQUEST)
            assert caught.value.error_class is ErrorClass.CONNECT
            with pytest.raises(BackendError) as caught:
                drain(client.stream(REQUEST))
            assert caught.value.error_class is ErrorClass.CONNECT
            assert client.live() is False
    finally:
        sock.close()


def test_shared_pool_still_uses_the_backend_timeouts(
    sim_url: str, control: SimulatorControl
) -> None:
    control.set_faults(mode="hang")
    with httpx.Client(timeout=30) as shared:
        client = client_for(make_config("openai", sim_url, read_timeout=0.2), http=shared)
        with pytest.raises(BackendError) as caught:
            client.chat(REQUEST)
        client.close()  # a borrowed pool is left open for its owner
        assert not shared.is_closed
    assert caught.value.error_class is ErrorClass.TIMEOUT
    assert "read timeout after 0.2s" in caught.value.message


# -- liveness ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_live(
    protocol: str, sim_url: str, control: SimulatorControl, shared_http: httpx.Client
) -> None:
    client = client_for(make_config(protocol, sim_url), http=shared_http)
    assert client.live() is True
    assert control.stats()["endpoints"] == {LIVENESS[protocol]: 1}
    control.set_faults(mode="error_500", scope="chat")
    assert client.live() is True  # the server is up; only inference fails
    control.set_faults(mode="overloaded")
    assert client.live() is False
    with pytest.raises(BackendError) as caught:
        client.check_live()
    assert caught.value.error_class is ErrorClass.OVERLOADED


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
    with httpx.Client(transport=_echoing_transport(seen)) as http:
        client = client_for(make_config(protocol, "http://backend.invalid"), http=http)
        with pytest.raises(BackendError) as caught:
            client.chat(REQUEST)
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


def test_api_key_not_in_transport_errors(sim_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="reset")
    with client_for(make_config("anthropic", sim_url)) as client, pytest.raises(BackendError) as c:
        client.chat(REQUEST)
    assert c.value.error_class is ErrorClass.CONNECT
    assert SECRET not in "".join(traceback.format_exception(c.value))


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
def _answering(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Client:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Client(
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
    with _answering(status, body) as http:
        client = client_for(make_config(protocol, "http://backend.invalid"), http=http)
        with pytest.raises(BackendError) as caught:
            client.chat(REQUEST)
    assert caught.value.error_class is expected
    assert caught.value.status == status


def test_rate_limit_with_an_http_date() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    with _answering(429, {"error": "slow down"}, {"Retry-After": later}) as http:
        client = client_for(make_config("ollama", "http://backend.invalid"), http=http)
        with pytest.raises(BackendError) as caught:
            client.chat(REQUEST)
    assert caught.value.retry_after is not None and 25 < caught.value.retry_after <= 30


def test_connect_timeout_is_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = client_for(make_config("openai", "http://backend.invalid"), http=http)
        with pytest.raises(BackendError) as caught:
            client.chat(REQUEST)
    assert caught.value.error_class is ErrorClass.TIMEOUT
    assert "connect timeout after 1.0s" in caught.value.message


# -- requests as each protocol wants them -----------------------------------------------
def _capturing(answer: dict[str, Any], seen: list[httpx.Request]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=answer)

    return httpx.Client(transport=httpx.MockTransport(handler))


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
    with _capturing(answer, seen) as http:
        client = client_for(make_config("anthropic", "https://api.example.com/v1"), http=http)
        assert client.chat(request).content == "ok"
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
    with _capturing(answer, seen) as http:
        client = client_for(make_config("ollama", "http://ollama:11434"), http=http)
        assert client.chat(request).content == "ok"
    body = json.loads(seen[0].content)
    assert body["options"] == {"temperature": 0.2, "seed": 3, "num_predict": 7}
    assert (body["stream"], body["format"], body["model"]) == (False, "json", "m-1")


def test_openai_request_keeps_client_parameters() -> None:
    seen: list[httpx.Request] = []
    answer = {"model": "m-1", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
    with _capturing(answer, seen) as http:
        client = client_for(make_config("openai", "http://vllm:8000"), http=http)
        assert client.chat(REQUEST | {"stream": True}).content == "ok"
    body = json.loads(seen[0].content)
    assert (body["model"], body["temperature"], "stream" in body) == ("m-1", 0.2, False)


# -- small pieces -----------------------------------------------------------------------
def test_client_for_picks_the_protocol(sim_url: str) -> None:
    kinds: dict[str, Callable[..., BackendClient]] = {
        "openai": OpenAIClient,
        "ollama": OllamaClient,
        "anthropic": AnthropicClient,
    }
    for protocol, kind in kinds.items():
        with client_for(make_config(protocol, sim_url)) as client:
            assert type(client) is kind


def test_error_classes() -> None:
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
