"""Routes: the request's ``model`` picks the chain of tiers its job runs down.

Pure tests of ``tierq/routes.py`` and of the configuration's checks first, then one real
deployment (API, relay, a worker per tier; Postgres and Redis) with two routes over shared
tiers, each tier's backend a simulator:

    llama-70b           big   → shared (with a notice and max_tokens 3 on this step)
    llama-8b (fast)     small → shared      small-sim: unsupported [tools, max_completion_tokens]
    edge                small
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from tests.deployment import Deployment, backend, deployment, tier
from tests.services import wait_until
from tests.test_failover import admin_headers
from tierq import routes
from tierq.config import ConfigError, TierqConfig, parse_config
from tierq.errors import ErrorClass
from tierq.features import Feature, needs

# -- the configuration --------------------------------------------------------------------


def _backend(name: str, protocol: str = "openai", **options: Any) -> dict[str, Any]:
    return {"name": name, "protocol": protocol, "url": "http://127.0.0.1:1", "model": name,
            **options}  # fmt: skip


def _config(routes_: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tiers": [
            {"name": "big", "backends": [_backend("big-b")]},
            {"name": "small", "backends": [_backend("small-b", unsupported=["tools"])],
             "degrade": {"max_tokens": 64}},
            {"name": "shared", "backends": [_backend("shared-b", "ollama")]},
        ],
        **top,
    }  # fmt: skip
    if routes_ is not None:
        doc["routes"] = routes_
    return doc


ROUTES = [
    {"model": "llama-70b", "chain": [{"tier": "big"}, {"tier": "shared"}]},
    {"model": "llama-8b", "aliases": ["fast"], "chain": [
        {"tier": "small"},
        {"tier": "shared", "degrade": {"max_tokens": 16, "notice": "smaller"},
         "escalate_on": ["timeout"], "call_timeout": 2.5},
    ]},
    {"model": "edge", "chain": [{"tier": "small"}]},
]  # fmt: skip


def config(routes_: list[dict[str, Any]] | None = ROUTES, **top: Any) -> TierqConfig:
    return parse_config(yaml.safe_dump(_config(routes_, **top)))


@pytest.mark.parametrize(
    ("routes_", "top", "names"),
    [
        (
            [{"model": "a", "chain": [{"tier": "big"}, {"tier": "nope"}]}],
            {},
            "routes.0.chain.1.tier: no tier 'nope'",
        ),
        (
            [{"model": "a", "chain": [{"tier": "big"}, {"tier": "big"}]}],
            {},
            "routes.0.chain.1.tier: 'big' is already a step",
        ),
        (
            [
                {"model": "a", "chain": [{"tier": "big"}]},
                {"model": "b", "aliases": ["a"], "chain": [{"tier": "small"}]},
            ],
            {},
            "routes.1: model name 'a' is used more than once",
        ),
        (
            [
                {"model": "a", "chain": [{"tier": "big"}]},
                {"model": "a", "chain": [{"tier": "small"}]},
            ],
            {},
            "routes.1: model name 'a' is used more than once",
        ),
        (
            [{"model": "a", "chain": [{"tier": "big"}]}],
            {"default_route": "b"},
            "default_route: no route with model 'b'",
        ),
        (
            [{"model": "a", "aliases": ["b"], "chain": [{"tier": "big"}]}],
            {"default_route": "b"},  # an alias is not a route's model name
            "default_route: no route with model 'b'",
        ),
        ([{"model": "a", "chain": []}], {}, "routes.0.chain: List should have at least 1 item"),
        (
            [{"model": "a", "chain": [{"tier": "big", "escalate_on": ["bogus"]}]}],
            {},
            "routes.0.chain.0.escalate_on.0: Input should be",
        ),
        (
            [{"model": "a", "chain": [{"tier": "big", "call_timeout": 0}]}],
            {},
            "routes.0.chain.0.call_timeout: Input should be greater than 0",
        ),
        ([{"model": "a", "chain": [{"tier": "big", "tiers": 1}]}], {}, "routes.0.chain.0.tiers"),
        (
            [{"model": "", "chain": [{"tier": "big"}]}],
            {},
            "routes.0.model: String should have at least 1 character",
        ),
    ],
)
def test_a_bad_route_names_its_key(
    routes_: list[dict[str, Any]], top: dict[str, Any], names: str
) -> None:
    with pytest.raises(ConfigError) as error:
        config(routes_, **top)
    assert names in str(error.value)


def test_an_unknown_feature_names_its_key() -> None:
    doc = _config()
    doc["tiers"][0]["backends"][0]["unsupported"] = ["tools", "telepathy"]
    with pytest.raises(ConfigError) as error:
        parse_config(yaml.safe_dump(doc))
    assert "tiers.0.backends.0.unsupported.1: Input should be" in str(error.value)


def test_resolve_by_model_and_alias() -> None:
    conf = config()
    big, fast = routes.resolve(conf, "llama-70b"), routes.resolve(conf, "fast")
    assert big.model == "llama-70b" and big.tier_names == ["big", "shared"]
    assert fast is routes.resolve(conf, "llama-8b")
    assert fast.model == "llama-8b" and fast.tier_names == ["small", "shared"]
    with pytest.raises(routes.ModelNotFound):
        routes.resolve(conf, "llama-405b")
    with pytest.raises(routes.ModelNotFound):
        routes.resolve(conf, "Llama-70B")  # names are exact
    assert [c.model for c in routes.listed(conf)] == ["llama-70b", "llama-8b", "edge"]

    # With default_route, a model no route names takes that route.
    conf = config(default_route="edge")
    assert routes.resolve(conf, "llama-405b").model == "edge"
    assert routes.resolve(conf, "fast").model == "llama-8b"


def test_steps_take_their_own_rules_or_their_tiers() -> None:
    chain = routes.resolve(config(), "fast")
    small, shared = chain.steps
    assert small.degrade == small.tier.degrade and small.degrade.max_tokens == 64
    assert small.escalate_on == frozenset(c for c in ErrorClass if c.retryable)
    assert small.call_timeout is None
    assert shared.degrade.max_tokens == 16 and shared.degrade.notice == "smaller"
    assert shared.escalate_on == {ErrorClass.TIMEOUT} and shared.call_timeout == 2.5
    assert chain.step("shared") is shared and chain.is_first("small")
    assert not chain.is_first("shared")
    assert chain.step("big").tier.name == "big"  # not a step: the tier's own rules (below)


def test_first_and_next_tier_skip_steps_that_cannot_serve() -> None:
    conf = config()
    fast, big, edge = (routes.resolve(conf, m) for m in ("fast", "llama-70b", "edge"))
    tools = {Feature.TOOLS}
    assert fast.first_tier() == "small" and fast.next_tier("small") == "shared"
    assert fast.next_tier("shared") is None
    assert fast.first_tier(tools) == "shared"  # small-b declares unsupported: [tools]
    assert big.first_tier(tools) == "big" and big.next_tier("big", tools) == "shared"

    # Ollama's protocol carries no logprobs: the only step after big cannot serve them.
    assert big.next_tier("big", {Feature.LOGPROBS}) is None
    assert big.first_tier({Feature.LOGPROBS}) == "big"
    # max_completion_tokens is never a need (it is sent as max_tokens).
    assert fast.first_tier({Feature.MAX_COMPLETION_TOKENS}) == "small"

    nothing = edge.first_tier(tools)
    assert isinstance(nothing, routes.Unservable)
    assert nothing.features == (Feature.TOOLS,) and nothing.field == "tools"
    assert "tools" in str(nothing)
    both = fast.first_tier({Feature.TOOLS, Feature.LOGPROBS})
    assert isinstance(both, routes.Unservable)
    assert set(both.features) == {Feature.TOOLS, Feature.LOGPROBS}


def test_a_tier_serves_what_one_of_its_backends_can_do_whole() -> None:
    doc = _config(ROUTES)
    doc["tiers"][1]["backends"] = [
        _backend("s1", unsupported=["tools"]),
        _backend("s2", unsupported=["images"]),
    ]
    conf = parse_config(yaml.safe_dump(doc))
    small = conf.tier("small")
    assert routes.can_serve(small, {Feature.TOOLS}) and routes.can_serve(small, {Feature.IMAGES})
    # No one backend does both: the tier cannot serve a request needing both.
    assert not routes.can_serve(small, {Feature.TOOLS, Feature.IMAGES})
    assert routes.resolve(conf, "fast").first_tier({Feature.TOOLS, Feature.IMAGES}) == "shared"


def test_what_a_request_needs() -> None:
    ask = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f"}}
    assert needs({"messages": ask}) == frozenset()
    assert needs({"messages": ask, "tools": [tool]}) == {Feature.TOOLS}
    assert needs({"messages": ask, "tools": [tool], "tool_choice": "none"}) == frozenset()
    result = [*ask, {"role": "assistant", "tool_calls": [{"id": "c"}]},
              {"role": "tool", "tool_call_id": "c", "content": "18"}]  # fmt: skip
    assert needs({"messages": result}) == {Feature.TOOLS}

    def image(url: str) -> list[dict[str, Any]]:
        parts = [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": url}}]
        return [{"role": "user", "content": parts}]

    assert needs({"messages": image("data:image/png;base64,AAAA")}) == {Feature.IMAGES}
    by_address = needs({"messages": image("https://x/y.png")})
    assert by_address == {Feature.IMAGES, Feature.IMAGE_URLS}
    everything = {"response_format": {"type": "json_schema"}, "n": 2, "logprobs": True}
    assert needs({"messages": ask, **everything}) == {
        Feature.JSON_SCHEMA, Feature.CHOICES, Feature.LOGPROBS
    }  # fmt: skip
    assert needs({"messages": ask, "response_format": {"type": "text"}, "n": 1}) == frozenset()


def test_without_routes_every_model_runs_down_every_tier() -> None:
    conf = config(None)
    for model in ("tierq", "gpt-4o", "anything at all"):
        chain = routes.resolve(conf, model)
        assert chain.model == routes.DEFAULT_ROUTE
        assert chain.tier_names == ["big", "small", "shared"]
    assert [c.model for c in routes.listed(conf)] == [routes.DEFAULT_ROUTE]
    # A job from before routes (no route name) runs down the first route.
    assert routes.of_job(conf, None).model == routes.DEFAULT_ROUTE
    assert routes.of_job(config(), None).model == "llama-70b"
    assert routes.of_job(config(), "llama-8b").tier_names == ["small", "shared"]
    assert routes.of_job(config(), "gone").model == "llama-70b"  # a route since removed


# -- a deployment with two routes over shared tiers ------------------------------------------

SIMS = ("big-sim", "small-sim", "shared-sim")


def shared_tiers(urls: dict[str, str]) -> dict[str, Any]:
    return {
        "tiers": [
            tier("big", backend("big-sim", "openai", urls["big-sim"])),
            tier("small", backend("small-sim", "openai", urls["small-sim"],
                                  unsupported=["tools", "max_completion_tokens"])),
            tier("shared", backend("shared-sim", "ollama", urls["shared-sim"])),
        ],
        "routes": [
            {"model": "llama-70b", "chain": [
                {"tier": "big"},
                {"tier": "shared", "degrade": {"notice": "[70b fallback]", "max_tokens": 3}},
            ]},
            {"model": "llama-8b", "aliases": ["fast"],
             "chain": [{"tier": "small"}, {"tier": "shared"}]},
            {"model": "edge", "chain": [{"tier": "small"}]},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("routes")
    with deployment(folder, config=shared_tiers, simulators=SIMS) as d:
        d.stack.api()
        d.stack.relay()
        for name in ("big", "small", "shared"):
            d.stack.worker(name)
        yield d


@pytest.fixture
def http(d: Deployment) -> Iterator[httpx.Client]:
    with d.client() as client:
        yield client


@pytest.fixture
def client(d: Deployment) -> OpenAI:
    return OpenAI(base_url=f"{d.stack.api_url}/v1", api_key=d.key, max_retries=0)


def marker() -> str:
    return uuid.uuid4().hex[:10]


def ask(mark: str | None = None, text: str = "hello") -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"{text} ({mark or marker()})"}]


def answered(http: httpx.Client, model: str, mark: str | None = None, **extra: Any) -> Any:
    response = http.post("/v1/jobs", json={"model": model, "messages": ask(mark), **extra})
    assert response.status_code == 202, response.text
    job = http.get(f"/v1/jobs/{response.json()['id']}", params={"wait": 20}).json()
    assert job["status"] == "succeeded", job
    return job


def received(d: Deployment, sim: str, mark: str) -> list[dict[str, Any]]:
    """The chat bodies ``sim`` received that mention ``mark``."""
    log = httpx.get(f"{d.simulators[sim]}/_sim/requests").json()["requests"]
    return [e["body"] for e in log if mark in str(e["body"]) and "chat" in e["endpoint"]]


def test_each_model_runs_down_its_own_chain(d: Deployment, http: httpx.Client) -> None:
    for model, route, sim in [
        ("llama-70b", "llama-70b", "big-sim"),
        ("llama-8b", "llama-8b", "small-sim"),
        ("fast", "llama-8b", "small-sim"),
    ]:
        mark = marker()
        job = answered(http, model, mark)
        served = job["served_by"]
        assert (served["tier"], served["backend"]) == (sim.removesuffix("-sim"), sim)
        assert served["quality"] == "full", job
        assert d.job(job["id"])["route"] == route
        answer = job["result"]["choices"][0]["message"]["content"]
        assert answer == f"[{sim}] You said: hello ({mark})"
        # The backend is asked for its own model, whatever name the client used.
        (body,) = received(d, sim, mark)
        assert body["model"] == f"{sim}-model"


def test_an_unknown_model_is_not_found_everywhere(
    d: Deployment, http: httpx.Client, client: OpenAI
) -> None:
    before = len(http.get("/v1/jobs", params={"limit": 100}).json()["data"])
    response = http.post("/v1/jobs", json={"model": "llama-405b", "messages": ask()})
    assert response.status_code == 404
    problem = response.json()
    assert problem["error"]["code"] == "model_not_found"
    assert problem["error"]["param"] == "model" and "llama-405b" in problem["error"]["message"]
    assert problem["errors"][0]["field"] == "model"

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="llama-405b", messages=ask())  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError) as streamed:
        client.chat.completions.create(
            model="llama-405b",
            messages=ask(),  # type: ignore[arg-type]
            stream=True,
        )
    assert streamed.value.code == "model_not_found"

    conversation = http.post("/v1/conversations", json={"system": "be brief"}).json()["id"]
    url = f"/v1/conversations/{conversation}/messages"
    response = http.post(url, json={"model": "llama-405b", "messages": ask()})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    # Nothing was written: no job, no turn.
    turns = http.get(f"/v1/conversations/{conversation}").json()["turns"]
    assert [t["role"] for t in turns] == ["system"]
    assert len(http.get("/v1/jobs", params={"limit": 100}).json()["data"]) == before
    # The same conversation takes a message for a model that exists.
    response = http.post(url, json={"model": "fast", "messages": ask()})
    assert response.status_code == 202 and response.json()["served_by"]["tier"] == "small"


def recover(d: Deployment, http: httpx.Client, sim: str) -> None:
    """The fault off, and the backend back in use (a probe may have seen it fail)."""
    httpx.post(f"{d.simulators[sim]}/_sim/reset").raise_for_status()

    admin = admin_headers(d)  # the backends' details are an admin key's to see

    def usable() -> bool:
        rows = http.get("/health/backends", headers=admin).json()["data"]
        row = next(r for r in rows if r["name"] == sim)
        return row["health"] != "down" and row["circuit"] == "closed"

    wait_until(usable, 30, 0.2, what=f"{sim} back in use")


def test_a_failing_primary_falls_back_within_its_route(d: Deployment, http: httpx.Client) -> None:
    d.fault("big-sim", mode="error_500", scope="chat")
    try:
        big = answered(http, "llama-70b")
        small = answered(http, "fast")
    finally:
        recover(d, http, "big-sim")
    assert big["served_by"]["tier"] == "shared" and big["served_by"]["backend"] == "shared-sim"
    assert big["served_by"]["quality"] == "reduced"
    # The route's own degrade rules for that step: a notice, and at most 3 tokens.
    choice = big["result"]["choices"][0]
    assert choice["message"]["content"] == "[70b fallback]\n\n[shared-sim] You said:"
    assert choice["finish_reason"] == "length"
    # The other route, whose chain ends on the same shared tier, is not touched.
    assert small["served_by"]["tier"] == "small" and small["served_by"]["quality"] == "full"

    # Its own fallback on the shared tier has its own rules (none: the tier's).
    d.fault("small-sim", mode="error_500", scope="chat")
    try:
        mark = marker()
        small = answered(http, "llama-8b", mark)
    finally:
        recover(d, http, "small-sim")
    assert small["served_by"]["tier"] == "shared" and small["served_by"]["quality"] == "reduced"
    text = small["result"]["choices"][0]["message"]["content"]
    assert text == f"[shared-sim] You said: hello ({mark})"


def test_max_completion_tokens_goes_as_max_tokens_where_it_is_not_known(
    d: Deployment, http: httpx.Client
) -> None:
    """small-sim declares unsupported: [max_completion_tokens]: it is sent max_tokens (a
    server that ignores the newer name would generate without a limit); big-sim gets the
    newer name as sent."""
    for model, sim in [("fast", "small-sim"), ("llama-70b", "big-sim")]:
        mark = marker()
        job = answered(http, model, mark, max_completion_tokens=2)
        assert job["served_by"]["backend"] == sim
        assert job["result"]["choices"][0]["finish_reason"] == "length"
        (body,) = received(d, sim, mark)
        if sim == "small-sim":
            assert body["max_tokens"] == 2 and "max_completion_tokens" not in body
        else:
            assert body["max_completion_tokens"] == 2 and "max_tokens" not in body


def test_models_lists_the_routes(d: Deployment, client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["llama-70b", "llama-8b", "fast", "edge"]
    assert models["llama-8b"].tierq == {  # type: ignore[attr-defined]
        "chain": ["small", "shared"],
        "aliases": ["fast"],
        "default": False,
    }
    assert models["fast"].tierq == {"alias_of": "llama-8b"}  # type: ignore[attr-defined]
    assert models["edge"].tierq["chain"] == ["small"]  # type: ignore[attr-defined]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tools_skip_a_step_whose_backend_cannot_call_them(
    d: Deployment, http: httpx.Client, client: OpenAI
) -> None:
    # llama-8b's first step (small-sim) declares unsupported: [tools]; shared answers.
    mark = marker()
    raw = client.chat.completions.with_raw_response.create(
        model="llama-8b",
        messages=ask(mark, "weather?"),
        tools=[WEATHER],  # type: ignore[arg-type]
    )
    assert raw.headers["x-tierq-tier"] == "shared"
    assert raw.headers["x-tierq-backend"] == "shared-sim"
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert received(d, "small-sim", mark) == []
    (body,) = received(d, "shared-sim", mark)
    assert body["tools"][0]["function"]["name"] == "get_weather"

    # llama-70b's first step can call tools: it keeps them.
    big = client.chat.completions.with_raw_response.create(
        model="llama-70b",
        messages=ask(text="weather?"),
        tools=[WEATHER],  # type: ignore[arg-type]
    )
    assert big.headers["x-tierq-tier"] == "big" and big.headers["x-tierq-quality"] == "full"
    assert big.parse().choices[0].finish_reason == "tool_calls"

    # edge has no step that can: a 400 naming tools, and no job.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="edge",
            messages=ask(text="weather?"),
            tools=[WEATHER],  # type: ignore[arg-type]
        )
    assert refused.value.code == "unsupported_feature" and refused.value.param == "tools"
    assert "tools" in str(refused.value)
    response = http.post("/v1/jobs", json={"model": "edge", "messages": ask(), "tools": [WEATHER]})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "tools"


def test_tools_a_request_forbids_are_not_sent_to_a_backend_without_them(
    d: Deployment, http: httpx.Client
) -> None:
    """tool_choice "none": the request needs no tools, so a step without them serves it;
    its backend, which cannot take tools, is not sent them (llama.cpp without --jinja
    refuses any request that has them)."""
    mark = marker()
    job = answered(http, "edge", mark, tools=[WEATHER], tool_choice="none",
                   parallel_tool_calls=False)  # fmt: skip
    assert job["served_by"]["backend"] == "small-sim"
    assert (
        job["result"]["choices"][0]["message"]["content"] == f"[small-sim] You said: hello ({mark})"
    )
    (body,) = received(d, "small-sim", mark)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(body)


def test_a_tier_that_is_no_step_of_its_route_runs_with_its_own_rules() -> None:
    """The configuration changed under a job: its route no longer has the tier it is on."""
    before = config()
    after = config([{"model": "llama-70b", "chain": [{"tier": "small"}, {"tier": "shared"}]}])
    chain = routes.of_job(after, "llama-70b")
    stray = chain.step("big")
    assert stray.tier == after.tier("big") and stray.degrade == after.tier("big").degrade
    assert stray.escalate_on == frozenset(c for c in ErrorClass if c.retryable)
    assert stray.call_timeout is None and not chain.is_first("big")
    # It moves on to the route's own first step that can serve the request.
    assert chain.next_tier("big") == "small"
    assert chain.next_tier("big", {Feature.TOOLS}) == "shared"
    # A route since removed: the first route's chain, the same way.
    assert routes.of_job(after, "llama-8b").next_tier("big") == "small"
    assert routes.of_job(before, "llama-70b").step("big").tier.name == "big"
    with pytest.raises(KeyError):
        chain.step("no-such-tier")


def test_a_job_left_on_a_tier_its_route_dropped_is_still_answered(
    d: Deployment, http: httpx.Client
) -> None:
    """Accepted onto big; big's worker then restarts with a configuration whose llama-70b
    route no longer has big. The job runs there once more (not as the route's first step)."""
    assert d.config_file is not None
    [worker] = [p for p in d.stack.processes if p.name == "worker-big" and p.alive()]
    worker.kill_group(signal.SIGKILL)
    original = d.config_file.read_text()
    try:
        response = http.post("/v1/jobs", json={"model": "llama-70b", "messages": ask()})
        assert response.status_code == 202 and response.json()["served_by"]["tier"] == "big"
        changed = yaml.safe_load(original)
        changed["routes"][0]["chain"] = [{"tier": "shared"}]
        d.config_file.write_text(yaml.safe_dump(changed))
        d.stack.worker("big")
        job = http.get(f"/v1/jobs/{response.json()['id']}", params={"wait": 20}).json()
    finally:
        d.config_file.write_text(original)
        for process in [p for p in d.stack.processes if p.name == "worker-big" and p.alive()]:
            process.kill_group(signal.SIGKILL)
        d.stack.worker("big")
    assert job["status"] == "succeeded", job
    assert job["served_by"]["tier"] == "big" and job["served_by"]["quality"] == "reduced"
