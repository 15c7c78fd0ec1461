"""Health probes against the real simulator: ``probe`` is synchronous (the prober's thread
pool calls it) and runs the asynchronous backend client on an event loop of its own."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from simulator.control import SimulatorControl
from tests.simulator_fixture import running_simulator
from tierq.config import BackendConfig
from worker.health import probe

LIVENESS = {"openai": "GET /v1/models", "ollama": "GET /api/version", "anthropic": "GET /v1/models"}
CHAT = {
    "openai": "POST /v1/chat/completions",
    "ollama": "POST /api/chat",
    "anthropic": "POST /v1/messages",
}


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with running_simulator("sim-p") as url:
        yield url


@pytest.fixture
def control(sim_url: str) -> Iterator[SimulatorControl]:
    with SimulatorControl(sim_url) as ctl:
        ctl.reset()
        yield ctl


def backend(protocol: str, url: str, **overrides: Any) -> BackendConfig:
    fields: dict[str, Any] = {
        "name": f"p-{protocol}",
        "protocol": protocol,
        "url": url,
        "model": "m-1",
        "connect_timeout": 1.0,
        "read_timeout": 5.0,
    }
    return BackendConfig(**(fields | overrides))


def test_probes_run_from_a_thread_pool_several_at_once(
    sim_url: str, control: SimulatorControl
) -> None:
    protocols = ["openai", "ollama", "anthropic"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(probe, [backend(p, sim_url) for p in protocols]))
    assert [(r.backend, r.health, r.error) for r in results] == [
        (f"p-{p}", "healthy", None) for p in protocols
    ]
    expected = {LIVENESS["openai"]: 2, LIVENESS["ollama"]: 1}  # openai and anthropic share it
    expected |= {CHAT[p]: 1 for p in protocols}  # the canary
    assert control.stats()["endpoints"] == expected


def test_a_paid_backend_gets_no_canary(sim_url: str, control: SimulatorControl) -> None:
    result = probe(backend("anthropic", sim_url, paid=True))
    assert result.health == "healthy"
    assert control.stats()["endpoints"] == {LIVENESS["anthropic"]: 1}


def test_a_failing_backend_is_down(sim_url: str, control: SimulatorControl) -> None:
    control.set_faults(mode="overloaded")
    result = probe(backend("openai", sim_url))
    assert result.health == "down"
    assert result.error is not None and result.error.startswith("overloaded: p-openai: HTTP 503")
    control.set_faults(mode="error_500", scope="chat")  # up, but its canary fails
    result = probe(backend("ollama", sim_url))
    assert result.health == "down"
    assert result.error is not None and result.error.startswith("server: p-ollama: HTTP 500")


def test_a_slow_backend_is_degraded(sim_url: str, control: SimulatorControl) -> None:
    control.set_faults(latency_ms=60)
    result = probe(backend("openai", sim_url, health={"degraded_latency_ms": 50}))
    assert (result.health, result.error) == ("degraded", None)
    assert result.latency_ms >= 120  # liveness and canary, 60 ms each
