"""Readiness follows the database and the broker: 503 naming the failing check while one
is down, 200 again once it is back. /health/backends shows what probes found, the models
a backend serves among it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.deployment import deployment
from tests.services import wait_until
from tests.simulator_fixture import running_simulator
from tests.test_metrics import admin_key  # noqa: F401 (a fixture)
from tierq.config import Protocol, TierqConfig, parse_config
from tierq.db import session_scope
from worker import circuit
from worker.health import probe_and_save
from worker.served_models import model_error, parse_model_list


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
    admin_key: str,  # noqa: F811 (the fixture imported above)
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
