"""docker-compose.yml is valid Compose and keeps tierq's deployment promises.

There is no Docker engine in CI, so the file is checked against the official Compose
Specification JSON schema, vendored verbatim as ``tests/data/compose-spec.json`` from
https://github.com/compose-spec/compose-spec, file ``schema/compose-spec.json``, commit
b2835e8acc1e42e7aecbc27a9bc4a1fc66ef21ba. Every mapping in that schema forbids unknown
keys, so a typo such as ``depend_on`` fails here instead of being silently ignored.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tierq.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"

# The `tierq` console script's subcommands (cli/main.py).
SUBCOMMANDS = {
    "api",
    "worker",
    "relay",
    "beat",
    "flower",
    "simulate",
    "migrate",
    "up",
    "keys",
    "config",
    "submit",
    "status",
    "watch",
}
MIGRATED = {"condition": "service_completed_successfully"}


def _load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_compose()


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def tierq_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run the tierq image (built from this repository)."""
    return {name: svc for name, svc in services.items() if "build" in svc}


def _errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def _seconds(duration: str) -> float:
    """A Compose duration (Go syntax: ``90s``, ``1m30s``, ``2m``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _workers(tierq_services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Service name -> tier, for the services that run ``tierq worker --tier T``."""
    found = {}
    for name, svc in tierq_services.items():
        command = svc.get("command")
        if command and command[0] == "worker":
            assert command[1:3] == ["--tier", command[2]], (name, command)
            found[name] = command[2]
    return found


# -- the file is valid Compose -------------------------------------------------------


def test_compose_file_matches_the_compose_specification(compose, validator):
    assert _errors(validator, compose) == []


@pytest.mark.parametrize(
    "break_it, complaint",
    [
        # a misspelled key: the classic silent no-op
        (
            lambda c: c["services"]["api"].update(depend_on=c["services"]["api"].pop("depends_on")),
            "depend_on",
        ),
        # a condition Compose does not know
        (
            lambda c: c["services"]["api"]["depends_on"]["migrate"].update(
                condition="service_completed"
            ),
            "service_completed",
        ),
        # a bare number is not a duration
        (lambda c: c["services"]["worker-gpu"].update(stop_grace_period=90), "90"),
        # an unknown top-level key (only x-* extensions are allowed)
        (lambda c: c.update(service={}), "service"),
    ],
    ids=["depend_on", "bad-condition", "grace-period-int", "top-level-typo"],
)
def test_validator_rejects_a_broken_copy(validator, break_it, complaint):
    broken = copy.deepcopy(_load_compose())
    break_it(broken)
    errors = _errors(validator, broken)
    assert errors, "a broken compose file passed the schema"
    assert any(complaint in e for e in errors), errors


def test_vendored_schema_is_the_official_one():
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["title"] == "Compose Specification"
    service = schema["definitions"]["service"]
    assert service["additionalProperties"] is False
    assert "depends_on" in service["properties"]


# -- tierq's promises ------------------------------------------------------------------


def test_every_tierq_command_is_a_real_subcommand(tierq_services):
    assert tierq_services, "no service builds the tierq image"
    for name, svc in tierq_services.items():
        command = svc.get("command")
        assert isinstance(command, list) and command, f"{name}: command must be a list"
        assert command[0] in SUBCOMMANDS, f"{name}: 'tierq {command[0]}' is no subcommand"


def test_one_worker_service_per_configured_tier(tierq_services):
    tiers = load_config().tier_names
    workers = _workers(tierq_services)
    # plus the webhook delivery worker, on its own queue
    assert sorted(workers.values()) == sorted([*tiers, "webhooks"]), workers
    for name, tier in workers.items():
        assert name == f"worker-{tier}"


def _soft_shutdown_timeout() -> float:
    """worker_soft_shutdown_timeout as tierq configures Celery (no broker contacted)."""
    from celery import Celery

    from tierq.broker import configure
    from tierq.settings import Settings

    app = Celery("compose-test", set_as_current=False)
    configure(app, Settings(broker_url="redis://redis:6379/0"))
    return float(app.conf.worker_soft_shutdown_timeout)


def test_workers_shut_down_softly(tierq_services):
    soft = _soft_shutdown_timeout()
    assert soft > 0, "soft shutdown is disabled in tierq.broker"
    for name in _workers(tierq_services):
        svc = tierq_services[name]
        assert svc.get("stop_signal") == "SIGTERM", name
        # SIGTERM must stay Celery's warm shutdown, which the worker bounds itself (it
        # stops its calls and hands their jobs back); remapped to the cold shutdown it would
        # fail on the threads pool (terminate_job is not implemented) and hand nothing over.
        assert "REMAP_SIGTERM" not in svc["environment"], name
        # Long enough for the grace and the hand-over.
        assert _seconds(svc["stop_grace_period"]) >= max(60, soft + 30), name


def test_exactly_one_beat(tierq_services):
    beats = [name for name, svc in tierq_services.items() if svc["command"][0] == "beat"]
    assert beats == ["beat"]
    beat = tierq_services["beat"]
    assert beat.get("scale", 1) == 1
    assert (beat.get("deploy") or {}).get("replicas", 1) == 1


def test_redis_never_evicts_and_persists(services):
    command = services["redis"]["command"]
    text = " ".join(command) if isinstance(command, list) else command
    assert "--maxmemory-policy noeviction" in text
    assert "--appendonly yes" in text
    assert "allkeys" not in text and "volatile" not in text


def test_postgres_is_healthchecked_and_durable(services):
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:16")
    assert "pg_isready" in pg["healthcheck"]["test"]
    assert any(v.split(":")[0] == "pgdata" for v in pg["volumes"])


def test_api_and_workers_wait_for_migrations(tierq_services):
    migrate = tierq_services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert migrate.get("restart") == "no", "a one-shot must not be restarted after success"
    waiting = ["api", "beat", *_workers(tierq_services)]
    for name in waiting:
        assert tierq_services[name]["depends_on"]["migrate"] == MIGRATED, name


def test_api_is_published_and_probed_for_readiness(tierq_services):
    api = tierq_services["api"]
    assert api["command"] == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert "8000:8000" in api["ports"]
    assert any("/health/ready" in part for part in api["healthcheck"]["test"])


def test_flower_is_published(tierq_services):
    flower = tierq_services["flower"]
    assert flower["command"] == ["flower", "--port", "5555", "--address", "0.0.0.0"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]  # no auth: the host's loopback only


# The option of each serving subcommand that sets the interface it binds.
BIND_OPTIONS = {"api": "host", "flower": "address", "simulate": "host"}


def _bind_address(command: list[str]) -> str:
    """The interface a compose command binds, as the CLI resolves it (defaults included)."""
    from cli.main import main

    subcommand = main.commands[command[0]]
    context = subcommand.make_context(command[0], list(command[1:]))
    value = context.params[BIND_OPTIONS[command[0]]]
    if value is None:  # the API's default comes from its settings
        from tierq.settings import Settings

        value = Settings().api_host
    return value


def test_every_served_port_listens_beyond_the_containers_loopback(tierq_services):
    """A port published or exposed to other containers is unreachable if the process
    binds 127.0.0.1, the container's own loopback."""
    served = {n: s for n, s in tierq_services.items() if s.get("ports") or s.get("expose")}
    assert set(served) == {"api", "flower", "simulator"}
    for name, svc in served.items():
        assert _bind_address(svc["command"]) == "0.0.0.0", name


def test_shared_environment(tierq_services):
    for name, svc in tierq_services.items():
        if svc["command"][0] == "simulate":
            continue
        env = svc["environment"]
        assert env["TIERQ_DATABASE_URL"] == (
            "postgresql+psycopg://tierq:tierq@postgres:5432/tierq"
        ), name
        assert env["TIERQ_BROKER_URL"] == "redis://redis:6379/0", name


def test_no_secret_is_written_in_the_file(services):
    secret = re.compile(r"API_KEY|ADMIN_KEY|SECRET|TOKEN", re.IGNORECASE)
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        for key, value in env.items():
            if secret.search(key):
                # passed through from the shell (no value) or interpolated, never literal
                assert value is None or re.fullmatch(r"\$\{[^}]+\}", str(value)), (name, key)


def test_demo_tier_file_is_the_default_pointed_at_the_simulator(compose, tierq_services):
    """The mounted tier file is the built-in default with URLs on the simulator service."""
    demo = parse_config(compose["configs"]["tiers"]["content"], "docker-compose.yml")
    default = load_config()
    assert demo.tier_names == default.tier_names
    for mine, theirs in zip(demo.tiers, default.tiers, strict=True):
        assert len(mine.backends) == len(theirs.backends)
        for a, b in zip(mine.backends, theirs.backends, strict=True):
            port = b.url.rsplit(":", 1)[1]
            assert a.url == f"http://simulator:{port}", a.name
            assert a.model_copy(update={"url": b.url}) == b, a.name
    assert demo.model_copy(update={"tiers": default.tiers, "version": ""}) == (
        default.model_copy(update={"version": ""})
    )
    simulator = tierq_services["simulator"]
    assert simulator["command"][0] == "simulate"
    assert {str(p) for p in simulator["expose"]} >= {"9101", "9102", "9103"}
    for name, svc in tierq_services.items():
        if svc["command"][0] != "simulate":
            assert svc["environment"]["TIERQ_CONFIG"] == "/etc/tierq/tiers.yaml", name
            assert {"source": "tiers", "target": "/etc/tierq/tiers.yaml"} in svc["configs"]


def test_dockerfile_runs_tierq_as_non_root():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.MULTILINE)
    assert re.search(r"^RUN pip install \.", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["tierq"\]\s*$', text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
