"""The OpenAPI document is a contract, and schemathesis holds the server to it.

A real zero-install deployment (SQLite, the folder broker, simulated backends, an API, a
relay and two workers) is driven by schemathesis with every check and every phase: each
documented example, the coverage phase's edge cases (every documented status, methods the
path lacks, missing headers), fuzzing with valid and invalid data, and stateful sequences
(a job submitted, then read, cancelled, watched). A fixed seed and example budget keep the
run the same every time and well under a minute.

Next to it, the docs pages (pinned scripts with integrity, none in production) and the 405s.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import StopReason, events
from sqlalchemy import func, select

from tests.deployment import Deployment, deployment
from tests.services import wait_until
from tests.test_failover import wait_job
from tierq.db import make_engine
from tierq.models import Job

SEED = 20261202
MAX_EXAMPLES = 12  # per operation and phase: the budget that keeps the run under ~60 s

# Rules of a chat request that JSON Schema cannot state, so a request the schema allows may
# still be refused with a 4xx naming the field: the last message must be the user's or a
# tool's; text (unknown fields too) must hold no NUL or lone surrogate; a deadline must not
# be before the request arrived; tool_choice must name an offered tool; the same
# Idempotency-Key with another body; something no backend of the route can do (400).
REFUSABLE = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429", "5xx"]
# What a chat completion answers when its job does not succeed: the job failed on its
# backends (502), is parked (503), or had no answer in time, or its deadline passed (504).
CHAT_OUTCOMES = ["2xx", "3xx", "4xx", "502", "503", "504"]
# The messages and chat-completions bodies are POST /v1/jobs's (less conversation_id, plus
# stream): the coverage phase walks that body's edge cases there, some 1100 requests;
# these two get fuzzing and stateful sequences. (A chat completion waits for its answer.)
SAME_BODY = {"coverage": {"enabled": False}}


def _operations() -> list[dict[str, Any]]:
    refusable = {"positive_data_acceptance": {"expected-statuses": REFUSABLE}}
    return [
        {"include-path": "/v1/jobs", "include-method": "POST", "checks": refusable},
        {
            "include-path": "/v1/conversations/{conversation_id}/messages",
            "checks": refusable,
            "phases": SAME_BODY,
        },
        {
            "include-path": "/v1/chat/completions",
            "checks": {**refusable, "not_a_server_error": {"expected-statuses": CHAT_OUTCOMES}},
            "phases": SAME_BODY,
        },
        # A cursor is opaque: only one this API returned is valid, whatever its characters.
        {"include-path": "/v1/jobs", "include-method": "GET", "checks": refusable},
    ]


def contract_config(key: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {key}"},
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "database": "none",  # the same cases every run, none carried over
            },
            "checks": {"enabled": True},
            "phases": {"stateful": {"max-steps": 6}},
            "request-timeout": 20,
            "workers": 1,
            "cache": {"enabled": False},
            "operations": _operations(),
        }
    )


@dataclass
class Run:
    found: list[str] = field(default_factory=list)  # every failed check and error
    fuzzed: set[str] = field(default_factory=set)  # the operations that got requests


def _failures(event: events.ScenarioFinished | events.FuzzScenarioFinished) -> Iterator[str]:
    for nodes in event.recorder.checks.values():
        for node in nodes:
            if node.failure_info is not None:
                failure = node.failure_info.failure
                yield (
                    f"{event.recorder.label} [{node.name}] {failure.title}\n"
                    f"{failure.message}\n{node.failure_info.code_sample}"
                )


def run(stream: Any) -> Run:
    """What a run found, one readable entry each; a run cut short is a finding too (a
    server that stopped answering would otherwise find nothing)."""
    result = Run()
    for event in stream:
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            result.found += _failures(event)
        if isinstance(event, events.ScenarioFinished) and event.phase.name == "FUZZING":
            if event.recorder.cases:
                result.fuzzed.add(event.recorder.label)
        elif isinstance(event, events.NonFatalError):
            result.found.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            result.found.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            result.found += [f"after the run: {failure.title}" for failure in event.failures]
            if event.stop_reason != StopReason.COMPLETED:
                result.found.append(f"the run stopped early: {event.stop_reason}")
    return result


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("contract")
    with deployment(
        folder, "sqlite-filesystem", env={"TIERQ_CHAT_WAIT_SECONDS": "5", "TIERQ_KEY_RPS": "0"}
    ) as d:
        d.stack.api()
        d.stack.relay()
        d.stack.worker("gpu")
        d.stack.worker("cpu")
        yield d


def test_the_server_keeps_its_openapi_contract(
    deployed: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # Hypothesis keeps its files under the working directory
    schema = schemathesis.openapi.from_url(
        f"{deployed.stack.api_url}/openapi.json", config=contract_config(deployed.key)
    )
    result = run(schemathesis.engine.from_schema(schema).execute())
    assert not result.found, f"{len(result.found)} found:\n\n" + "\n\n".join(result.found)
    documented = {
        f"{method.upper()} {path}"
        for path, operations in schema.raw_schema["paths"].items()
        for method in operations
    }
    assert result.fuzzed == documented  # every operation was exercised, none skipped
    fuzzed_jobs_end_and_block_nothing(deployed, schema)


WORKER_FUZZ = 150  # jobs drawn from POST /v1/jobs's schema for the worker side


def fuzzed_jobs_end_and_block_nothing(d: Deployment, schema: Any) -> None:
    """The worker side: bodies drawn from POST /v1/jobs's schema (every field and extra
    shaped every way hypothesis can think of) are submitted, and every job the API accepts
    runs through the workers to the simulated backends to its end; none ends dead (a job
    that broke a worker). Then an ordinary job is answered at once: no tier was blocked."""
    bodies: list[Any] = []

    @settings(max_examples=WORKER_FUZZ, database=None, suppress_health_check=list(HealthCheck))
    @seed(SEED)
    @given(schema["/v1/jobs"]["POST"].as_strategy())
    def draw(case: Any) -> None:
        bodies.append(case.body)

    draw()
    headers = {"content-type": "application/json"}
    with d.client() as client:
        answers = [client.post("/v1/jobs", content=json.dumps(b), headers=headers) for b in bodies]
    accepted = sum(a.status_code == 202 for a in answers)
    assert accepted >= 20, [a.status_code for a in answers]  # the fuzz reached the workers
    assert {a.status_code for a in answers} <= {202, 400, 404, 413, 422}, answers
    engine = make_engine(d.database_url)
    try:

        def counts() -> dict[str, int]:
            with engine.connect() as conn:
                rows = conn.execute(select(Job.status, func.count()).group_by(Job.status))
                return {status: n for status, n in rows}

        def settled() -> bool:
            return not {s for s, n in counts().items() if n} & {"queued", "running", "retry_wait"}

        wait_until(settled, 180, 0.5, what="every fuzzed job to end")
        found = counts()
    finally:
        engine.dispose()
    assert found.get("dead", 0) == 0, found
    with d.client() as client:
        answered = wait_job(client, d.submit(client, "after the fuzz").json()["id"], 15)
    assert answered["status"] == "succeeded", answered


# --- the docs pages and 405s ------------------------------------------------------------


@pytest.fixture
def app_client(env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as client:
        yield client


def test_docs_pages_load_only_pinned_scripts_the_browser_checks(app_client: TestClient) -> None:
    """Every script and style a docs page loads names one exact version and carries its
    sha384; nothing else comes from another host (no favicon, no web font)."""
    for page in ("/docs", "/redoc"):
        html = app_client.get(page).text
        loads = re.findall(r'<(?:script|link)\b[^>]*?(?:src|href)="([^"]+)"([^>]*)>', html)
        external = [(url, rest) for url, rest in loads if "//" in url]
        assert external, page
        for url, rest in external:
            assert re.search(r"@\d+\.\d+\.\d+/", url), (page, url)  # not @5 or @latest
            integrity = re.search(r'integrity="sha384-([A-Za-z0-9+/=]+)"', rest)
            assert integrity and len(base64.b64decode(integrity[1])) == 48, (page, url)
            assert 'crossorigin="anonymous"' in rest, (page, url)
        hosts = set(re.findall(r"https?://([^/\"']+)", html))
        assert hosts == {"cdn.jsdelivr.net"}, (page, hosts)


def test_production_serves_no_docs_pages_but_the_document(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app
    from tierq.settings import get_settings

    monkeypatch.setenv("TIERQ_PRODUCTION", "true")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            assert client.get("/docs").status_code == 404
            assert client.get("/redoc").status_code == 404
            assert client.get("/openapi.json").status_code == 200
    finally:
        monkeypatch.delenv("TIERQ_PRODUCTION")
        get_settings.cache_clear()


def test_a_405_allows_every_method_of_its_path(app_client: TestClient) -> None:
    """Starlette said what the first route of the path allows: DELETE /v1/jobs → POST."""
    for method, path, allowed in (
        ("DELETE", "/v1/jobs", "GET, HEAD, POST"),
        ("PUT", "/v1/jobs", "GET, HEAD, POST"),
        ("DELETE", "/v1/jobs/3f1c0a56-8f2b-4d7e-9b1a-2c3d4e5f6a7b", "GET, HEAD"),
        ("GET", "/v1/jobs/3f1c0a56-8f2b-4d7e-9b1a-2c3d4e5f6a7b/cancel", "POST"),
    ):
        response = app_client.request(method, path)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allowed, (method, path)
        assert response.headers["content-type"] == "application/problem+json"


def test_every_error_the_document_declares_is_a_problem(app_client: TestClient) -> None:
    document = app_client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/health/ready":
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
    listing = document["paths"]["/v1/jobs"]
    assert {"401", "422", "429", "503"} <= set(listing["get"]["responses"])
    assert {"400", "401", "404", "413", "422", "429", "503"} <= set(listing["post"]["responses"])
    assert {"404", "409"} <= set(document["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"])
