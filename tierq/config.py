"""The tier configuration: one YAML file listing the tiers in order, with their backends.

Validated at load time; every error names the key it is about (``tiers.0.backends.1.url``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tierq.errors import ErrorClass
from tierq.features import Feature, unsupported

EMERGENCY_QUEUE = "emergency"
RESERVED_NAMES = {EMERGENCY_QUEUE, "minimal", "webhooks"}

Protocol = Literal["openai", "ollama", "anthropic"]
OnExhausted = Literal["degrade", "park", "fail"]


class ConfigError(ValueError):
    """The tier configuration is invalid; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerConfig(_Strict):
    """Open when failures / calls >= failure_rate over at least min_calls in the window."""

    window_seconds: float = Field(30.0, gt=0)
    min_calls: int = Field(5, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)
    recovery_timeout: float = Field(10.0, gt=0, description="OPEN this long, then HALF_OPEN.")
    half_open_successes: int = Field(2, ge=1, description="Trial successes that close it.")
    slow_start_seconds: float = Field(10.0, ge=0, description="Traffic ramp after closing.")


class HealthConfig(_Strict):
    interval: float = Field(5.0, gt=0, description="Seconds between probes of a backend.")
    canary: bool | None = Field(
        None, description="Deep probe with a tiny inference; default off for paid APIs."
    )
    degraded_latency_ms: float = Field(2000.0, gt=0)


class BackendConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    protocol: Protocol
    url: str = Field(pattern=r"^https?://")
    model: str
    api_key_env: str | None = Field(
        None, description="Environment variable holding the key; the key is never in the file."
    )
    connect_timeout: float = Field(2.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    max_concurrency: int = Field(8, ge=1)
    context_window: int | None = Field(None, ge=1, description="Tokens the model accepts.")
    larger_context: str | None = Field(
        None, description="Backend to send a request that does not fit this one's context."
    )
    paid: bool = Field(False, description="Calls cost money: no canary probes by default.")
    breaker: BreakerConfig | None = Field(None, description="Overrides the tier's breaker.")
    health: HealthConfig = HealthConfig()
    dialect: Literal["llama.cpp"] | None = Field(
        None,
        description="An OpenAI-protocol server's own quirks, translated: llama.cpp "
        "(llama-cpp-python's server).",
    )
    unsupported: list[Feature] = Field(
        default_factory=list,
        description="What the server cannot do (tools, images, json_schema, ...): requests "
        "that need it skip this backend; max_completion_tokens is sent as max_tokens.",
    )

    @property
    def lacks(self) -> frozenset[Feature]:
        """What this backend cannot do: declared, and what its protocol cannot carry."""
        return unsupported(self.protocol, self.unsupported, self.dialect)

    @property
    def canary(self) -> bool:
        return self.health.canary if self.health.canary is not None else not self.paid

    @property
    def api_key(self) -> SecretStr | None:
        value = os.environ.get(self.api_key_env) if self.api_key_env else None
        return SecretStr(value) if value else None


class RetryConfig(_Strict):
    attempts: int = Field(2, ge=1, description="Calls per tier before escalating.")
    base_delay: float = Field(0.5, ge=0)
    max_delay: float = Field(30.0, ge=0)
    budget: float = Field(
        0.2, ge=0, le=1, description="Retries at most this share of a backend's calls."
    )

    @field_validator("max_delay")
    @classmethod
    def _not_below_base_delay(cls, max_delay: float, info: ValidationInfo) -> float:
        base_delay = info.data.get("base_delay")
        if base_delay is not None and base_delay > max_delay:
            raise ValueError(f"{max_delay:g} is less than base_delay {base_delay:g}")
        return max_delay


class DegradeConfig(_Strict):
    """What changes in a request when it reaches this tier from an earlier one."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    notice: str | None = None


class TierConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    backends: list[BackendConfig] = Field(min_length=1)
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    degrade: DegradeConfig = DegradeConfig()


RETRYABLE = [c for c in ErrorClass if c.retryable]


class StepConfig(_Strict):
    """One step of a route's chain: a tier, and how a job moves on from it."""

    tier: str
    degrade: DegradeConfig | None = Field(
        None, description="What changes in a request that reaches this step (default: the "
        "tier's degrade rules); never applied on the first step."
    )  # fmt: skip
    escalate_on: list[ErrorClass] = Field(
        default_factory=lambda: list(RETRYABLE),
        description="Failures that move a job on to the next step once this step's tries "
        "are used up; others end the route there (on_exhausted).",
    )
    call_timeout: float | None = Field(
        None, gt=0, description="Seconds a call on this step may take: a slower one is "
        "abandoned as a timeout (a latency bound that moves jobs on)."
    )  # fmt: skip


class RouteConfig(_Strict):
    """A model name clients send (and its aliases), mapped to a chain of tiers."""

    model: str = Field(min_length=1, max_length=255)
    aliases: list[str] = Field(default_factory=list)
    description: str | None = None
    chain: list[StepConfig] = Field(min_length=1)

    @property
    def names(self) -> list[str]:
        return [self.model, *self.aliases]


class MinimalConfig(_Strict):
    cache_max_age: float = Field(3600.0, ge=0)
    rules: str | None = Field(None, pattern=r"^[\w.]+:[\w]+$")
    static_message: str | None = None

    @field_validator("rules")
    @classmethod
    def _rules_callable_exists(cls, rules: str | None) -> str | None:
        # Found at config check, not by the first job that needs it during an outage.
        if rules is not None:
            load_callable(rules)
        return rules


def load_callable(path: str) -> object:
    """The callable named by ``module:name``; ValueError saying why it cannot be had."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure makes the rules unusable
        raise ValueError(f"cannot import '{module_name}': {exc}") from exc
    target = getattr(module, name, None)
    if not callable(target):
        raise ValueError(f"'{module_name}' has no callable '{name}'")
    return target


class EmergencyConfig(_Strict):
    retry_after: int = Field(60, ge=1, description="Seconds shown to pollers of a parked job.")
    replay_rate: float = Field(5.0, gt=0, description="Parked jobs released per second.")
    message: str = "All inference backends are unavailable; the request is parked."


class TierqConfig(_Strict):
    tiers: list[TierConfig] = Field(min_length=1)
    minimal: MinimalConfig = MinimalConfig()
    emergency: EmergencyConfig = EmergencyConfig()
    on_exhausted: OnExhausted = "park"
    routes: list[RouteConfig] = Field(
        default_factory=list,
        description="Model names and their chains of tiers; none: one route, every tier in "
        "order, whatever model a request names.",
    )
    default_route: str | None = Field(
        None, description="The route of a model no route names (default: such a model is "
        "not found); a route's model name."
    )  # fmt: skip
    version: str = Field("", description="Filled in with the file's hash; not set by hand.")

    @model_validator(mode="after")
    def _names_are_unique(self) -> TierqConfig:
        tiers = [t.name for t in self.tiers]
        for i, name in enumerate(tiers):
            if name in RESERVED_NAMES:
                raise ValueError(f"tiers.{i}.name: '{name}' is reserved")
            if tiers.index(name) != i:
                raise ValueError(f"tiers.{i}.name: duplicate tier '{name}'")
        backends = [b.name for t in self.tiers for b in t.backends]
        for name in backends:
            if backends.count(name) > 1:
                raise ValueError(f"backend name '{name}' is used more than once")
        for i, tier in enumerate(self.tiers):
            for j, backend in enumerate(tier.backends):
                if backend.larger_context and backend.larger_context not in backends:
                    raise ValueError(
                        f"tiers.{i}.backends.{j}.larger_context: no backend "
                        f"'{backend.larger_context}'"
                    )
        return self

    @model_validator(mode="after")
    def _larger_context_chains_end(self) -> TierqConfig:
        """A request that does not fit moves along larger_context; a cycle would move it
        forever."""
        following = {b.name: b.larger_context for t in self.tiers for b in t.backends}
        for i, tier in enumerate(self.tiers):
            for j, backend in enumerate(tier.backends):
                chain = [backend.name]
                # Every member of a cycle comes back to itself; that member is named.
                while (step := following.get(chain[-1])) is not None and step not in chain[1:]:
                    if step == backend.name:
                        loop = " → ".join([*chain, step])
                        raise ValueError(
                            f"tiers.{i}.backends.{j}.larger_context: {loop} is a cycle"
                        )
                    chain.append(step)
        return self

    @model_validator(mode="after")
    def _routes_are_sound(self) -> TierqConfig:
        tiers, seen = set(self.tier_names), set()
        for i, route in enumerate(self.routes):
            for name in route.names:
                if name in seen:
                    raise ValueError(f"routes.{i}: model name '{name}' is used more than once")
                seen.add(name)
            steps = [step.tier for step in route.chain]
            for j, tier in enumerate(steps):
                if tier not in tiers:
                    raise ValueError(f"routes.{i}.chain.{j}.tier: no tier '{tier}'")
                if steps.index(tier) != j:
                    raise ValueError(f"routes.{i}.chain.{j}.tier: '{tier}' is already a step")
        if self.default_route is not None and self.default_route not in {
            r.model for r in self.routes
        }:
            raise ValueError(f"default_route: no route with model '{self.default_route}'")
        return self

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def tier(self, name: str) -> TierConfig:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    def next_tier(self, name: str) -> str | None:
        names = self.tier_names
        i = names.index(name)
        return names[i + 1] if i + 1 < len(names) else None

    @cached_property
    def backends(self) -> dict[str, BackendConfig]:
        return {b.name: b for t in self.tiers for b in t.backends}

    def tier_of(self, backend: str) -> TierConfig:
        return next(t for t in self.tiers if any(b.name == backend for b in t.backends))

    def breaker_for(self, backend: str) -> BreakerConfig:
        return self.backends[backend].breaker or self.tier_of(backend).breaker


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        # Whole-file checks name their key in the message themselves.
        named = not item["loc"] or message.startswith(("tiers.", "backend", "routes.", "default"))
        lines.append(message if named else f"{key}: {message}")
    return "; ".join(lines)


def parse_config(text: str, source: str = "<config>") -> TierqConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'tiers' key")
    data["version"] = hashlib.sha256(text.encode()).hexdigest()[:12]
    try:
        return TierqConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def load_config(path: Path | None = None) -> TierqConfig:
    """Load the file at ``path``, or the built-in default (simulated backends on loopback)."""
    if path is None:
        text = resources.files("tierq").joinpath("default_tiers.yaml").read_text()
        return parse_config(text, "default_tiers.yaml")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_config(text, str(path))
