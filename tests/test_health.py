"""Readiness follows the database and the broker: 503 naming the failing check while one
is down, 200 again once it is back. /health/backends shows admins what probes found, the
models a backend serves among it; other keys only whether each tier is live."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.deployment import deployment
from tests.services import wait_until
from tests.simulator_fixture import running_simulator
from tests.test_metrics import add_rows, auth
from tierq.config import Protocol, TierqConfig, parse_config
from tierq.db import session_scope
from worker import circuit
from worker.health import probe_and_save
from worker.served_models import model_error, parse_model_list


@pytest.fixture
def client(env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def admin_key(env: dict[str, str]) -> str:
    from tierq.keys import create_key

    with session_scope() as session:
        return create_key(session, "operator", is_admin=True).key


@pytest.mark.slow
def test_ready_turns_503_when_postgres_or_broker_stops(tmp_path: Path) -> None:
    with deployment(tmp_path, "throwaway-postgres") as d:
        assert d.postgres is not None and d.redis is not None
        d.stack.api()
        ready = f"{d.stack.api_url}/health/ready"

        def status() -> tuple[int, dict]:
            response = httpx.get(ready, timeout=15)
            return response.status_code, response.json()

        assert status()[0] == 200
        d.redis.stop()
        code, body = status()
        assert code == 503 and body["checks"]["database"] == "ok"
        assert body["checks"]["broker"].startswith("fail")
        assert httpx.get(f"{d.stack.api_url}/health/live").status_code == 200
        d.redis.start()
        wait_until(lambda: status()[0] == 200, 20, 0.5, what="ready after redis")
        d.postgres.stop()
        code, body = status()
        assert code == 503 and body["checks"]["database"].startswith("fail")
        d.postgres.start()
        wait_until(lambda: status()[0] == 200, 30, 0.5, what="ready after postgres")


# --- the model a backend serves ------------------------------------------------------


def config_for(name: str, url: str, model: str) -> TierqConfig:
    return parse_config(
        f"tiers:\n  - name: gpu\n    backends:\n      - name: {name}\n        protocol: openai\n"
        f"        url: {url}\n        model: {model}\n"
    )


def shown(config: TierqConfig, key: str) -> dict[str, Any]:
    from api.app import create_app

    with TestClient(create_app(config)) as client:  # the backends' details: admins only
        response = client.get("/health/backends", headers={"Authorization": f"Bearer {key}"})
    (backend,) = response.json()["data"]
    return backend


def test_backends_show_a_model_mismatch_until_the_model_is_served(
    env: dict[str, str],
    admin_key: str,
) -> None:
    name = f"models-{uuid.uuid4().hex[:8]}"
    with running_simulator("llama-sim") as url:  # serves one model: "llama-sim"
        wrong = config_for(name, url, "llama3")
        with session_scope() as session:
            circuit.ensure_rows(session, wrong)
        assert shown(wrong, admin_key)["served_models"] is None  # not probed yet: unknown
        probe_and_save(wrong.backends[name])
        backend = shown(wrong, admin_key)
        assert backend["served_models"] == ["llama-sim"]
        assert backend["model_error"] == "serves [llama-sim], not 'llama3'"
        assert backend["health"] == "healthy"  # reported, not marked down
        fixed = config_for(name, url, "llama-sim")
        probe_and_save(fixed.backends[name])
        backend = shown(fixed, admin_key)
    assert (backend["served_models"], backend["model_error"]) == (["llama-sim"], None)


@pytest.mark.parametrize(
    ("protocol", "body", "served"),
    [
        ("openai", {"object": "list", "data": [{"id": "a"}, {"id": "b"}]}, ["a", "b"]),
        ("anthropic", {"data": [{"id": "claude-x"}], "has_more": False}, ["claude-x"]),
        (
            "ollama",
            {"models": [{"name": "llama3:latest", "model": "llama3:latest"}]},
            ["llama3:latest"],
        ),
        ("ollama", {"models": [{"model": "qwen:7b"}]}, ["qwen:7b"]),
        ("ollama", {"models": []}, []),
        ("openai", {"status": "ok"}, None),
        ("openai", {"data": [{"name": "a"}]}, None),
        ("openai", ["a"], None),
        ("ollama", {"data": [{"id": "a"}]}, None),
    ],
)
def test_parse_model_list(protocol: Protocol, body: Any, served: list[str] | None) -> None:
    assert parse_model_list(protocol, body) == served


@pytest.mark.parametrize(
    ("protocol", "model", "served", "error"),
    [
        ("ollama", "llama3", ["llama3:latest"], None),
        ("ollama", "llama3:latest", ["llama3"], None),
        ("ollama", "llama3", ["llama3:8b"], "serves [llama3:8b], not 'llama3'"),
        ("ollama", "host:5000/llama3", ["host:5000/llama3:latest"], None),
        ("openai", "x", ["a", "b"], "serves [a, b], not 'x'"),
        ("openai", "x", [], "serves [], not 'x'"),
        ("openai", "x", None, None),
        ("anthropic", "claude-sonnet-4-5", ["claude-sonnet-4-5-20250929"], None),
        ("anthropic", "claude-3-7-sonnet-latest", ["claude-3-7-sonnet-20250219"], None),
        ("anthropic", "claude-sonnet-4-0", ["claude-sonnet-4-20250514"], None),
        (
            "anthropic",
            "claude-3-5-sonnet-20240620",
            ["claude-3-5-sonnet-20241022"],
            "serves [claude-3-5-sonnet-20241022], not 'claude-3-5-sonnet-20240620'",
        ),
    ],
)
def test_model_error(
    protocol: Protocol, model: str, served: list[str] | None, error: str | None
) -> None:
    assert model_error(protocol, model, served) == error


def test_a_long_model_list_is_cut_short_in_the_error() -> None:
    served = [f"m{i}" for i in range(12)]
    error = model_error("openai", "x", served)
    assert error == "serves [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, … (2 more)], not 'x'"


# --- /health/backends ------------------------------------------------------------------


def test_backends_need_a_key(client: TestClient) -> None:
    response = client.get("/health/backends")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


def test_backends_lists_the_configured_backends_without_secrets_to_admins(
    client: TestClient, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"sk-ant-{uuid.uuid4().hex}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    response = client.get("/health/backends", headers=auth(admin_key))
    assert response.status_code == 200
    assert [t["tier"] for t in response.json()["tiers"]] == ["gpu", "cpu", "hosted"]
    data = response.json()["data"]
    assert [(b["name"], b["tier"], b["protocol"]) for b in data] == [
        ("gpu-vllm", "gpu", "openai"),
        ("cpu-ollama", "cpu", "ollama"),
        ("hosted-anthropic", "hosted", "anthropic"),
    ]
    assert set(data[0]) == {
        "name",
        "tier",
        "protocol",
        "url",
        "health",
        "circuit",
        "disabled",
        "last_probe_at",
        "last_latency_ms",
        "last_error",
        "served_models",
        "model_error",
    }
    assert secret not in response.text and "api_key" not in response.text


def test_backends_show_the_shared_state_row(env: dict[str, str], admin_key: str) -> None:
    from api.app import create_app
    from tierq.config import parse_config
    from tierq.db import db_now
    from tierq.models import Backend

    name = f"metrics-{uuid.uuid4().hex[:8]}"
    config = parse_config(
        f"tiers:\n  - name: gpu\n    backends:\n      - name: {name}\n        protocol: openai\n"
        "        url: http://127.0.0.1:1\n        model: m\n"
    )
    add_rows(
        Backend(
            name=name,
            tier="gpu",
            health="degraded",
            circuit="open",
            disabled=True,
            last_probe_at=db_now(),
            last_latency_ms=2500.0,
            last_error="slow",
        )
    )
    with TestClient(create_app(config)) as client:
        (backend,) = client.get("/health/backends", headers=auth(admin_key)).json()["data"]
    assert backend["name"] == name and backend["url"] == "http://127.0.0.1:1"
    shown = {k: backend[k] for k in ("health", "circuit", "disabled", "last_error")}
    assert shown == dict(health="degraded", circuit="open", disabled=True, last_error="slow")
    assert backend["last_latency_ms"] == 2500.0
    assert backend["last_probe_at"] is not None


def test_other_keys_see_only_whether_each_tier_is_live(env: dict[str, str], api_key: str) -> None:
    """No URL, error, model or breaker for a key that is not an admin's: live, degraded or
    down per tier, from the same rows."""
    from api.app import create_app
    from tierq.config import parse_config
    from tierq.models import Backend

    tag = uuid.uuid4().hex[:8]
    backends = {"a1": "a", "a2": "a", "b1": "b", "c1": "c", "d1": "d", "d2": "d"}
    config = parse_config(
        "tiers:\n"
        + "".join(
            f"  - name: {tier}-{tag}\n    backends:\n"
            + "".join(
                f"      - name: {name}-{tag}\n        protocol: openai\n"
                f"        url: http://10.9.8.7:1\n        model: secret-model\n"
                for name, of in backends.items()
                if of == tier
            )
            for tier in "abcd"
        )
    )
    rows = {  # c1 has no row yet (no worker touched it): given the benefit of the doubt
        "a1": dict(health="healthy", circuit="closed"),
        "a2": dict(health="healthy", circuit="open", last_error="boom at 10.9.8.7"),
        "b1": dict(health="down", circuit="closed"),
        "d1": dict(health="degraded", circuit="closed"),
        "d2": dict(health="healthy", circuit="closed", disabled=True),
    }
    add_rows(
        *(Backend(name=f"{n}-{tag}", tier=f"{backends[n]}-{tag}", **r) for n, r in rows.items())
    )
    with TestClient(create_app(config)) as client:
        response = client.get("/health/backends", headers=auth(api_key))
    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "tiers": [
            {"tier": f"a-{tag}", "status": "degraded"},
            {"tier": f"b-{tag}", "status": "down"},
            {"tier": f"c-{tag}", "status": "live"},
            {"tier": f"d-{tag}", "status": "degraded"},
        ],
    }
    for hidden in ("10.9.8.7", "secret-model", "a1-", "boom", "open"):
        assert hidden not in response.text
