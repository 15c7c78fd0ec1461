"""Routes: the request's ``model`` picks the chain of tiers its job runs down.

Tiers are the unit of workers and queues, shared by the routes that use them; a route is
an ordered chain of steps over them, each with its own degrade rules and the failures that
move a job on. A configuration without routes has one: every tier in order, for any model
name (as before routes existed). A step whose tier has no backend able to serve a request
(tools to a server without tools, an image to a text-only model) is skipped for it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from tierq.config import RETRYABLE, DegradeConfig, StepConfig, TierConfig, TierqConfig
from tierq.errors import ErrorClass
from tierq.features import FIELD_OF, Feature, missing

DEFAULT_ROUTE = "tierq"  # the model name of the route a configuration without routes has


class ModelNotFound(LookupError):
    """No route serves this model name."""


@dataclass(frozen=True)
class Unservable:
    """No step of the route has a backend that can do what the request needs."""

    features: tuple[Feature, ...]

    @property
    def field(self) -> str:
        return FIELD_OF.get(self.features[0], "messages")

    def __str__(self) -> str:
        return "no backend of this model's tiers supports " + ", ".join(self.features)


@dataclass(frozen=True)
class Step:
    tier: TierConfig
    degrade: DegradeConfig
    escalate_on: frozenset[ErrorClass]
    call_timeout: float | None


@dataclass(frozen=True)
class Chain:
    """A route resolved against the tiers: what a job of this route does on each tier.

    A job may be on a tier its route does not have: the configuration changed after the
    job moved there. It runs there with the tier's own rules (not as a first step), and
    moves on to its route's first step that can serve it."""

    model: str
    steps: tuple[Step, ...]
    tiers: Mapping[str, TierConfig] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tier_names(self) -> list[str]:
        return [s.tier.name for s in self.steps]

    def step(self, tier: str) -> Step:
        for step in self.steps:
            if step.tier.name == tier:
                return step
        if tier in self.tiers:  # no step of this route (any more)
            return Step(self.tiers[tier], self.tiers[tier].degrade, frozenset(RETRYABLE), None)
        raise KeyError(f"tier '{tier}' is not a step of route '{self.model}'")

    def is_first(self, tier: str) -> bool:
        return self.steps[0].tier.name == tier

    def first_tier(self, needs: Collection[Feature] = ()) -> str | Unservable:
        """The first step that can serve the request, or what nothing can serve."""
        found = self._from(0, needs)
        if found is not None:
            return found
        lacking = {f for s in self.steps for f in _missing_in(s.tier, needs)}
        return Unservable(tuple(sorted(lacking)))

    def next_tier(self, tier: str, needs: Collection[Feature] = ()) -> str | None:
        """The step after ``tier`` that can serve the request, if any (from a tier that is
        no step of the route: its first step that can)."""
        names = self.tier_names
        return self._from(names.index(tier) + 1 if tier in names else 0, needs)

    def _from(self, start: int, needs: Collection[Feature]) -> str | None:
        for step in self.steps[start:]:
            if not _missing_in(step.tier, needs):
                return step.tier.name
        return None


def _missing_in(tier: TierConfig, needs: Collection[Feature]) -> list[Feature]:
    """What no backend of the tier can do (empty: some backend can do it all)."""
    gaps = [missing(needs, backend.lacks) for backend in tier.backends]
    return [] if any(not gap for gap in gaps) else min(gaps, key=len)


def can_serve(tier: TierConfig, needs: Collection[Feature]) -> bool:
    return not _missing_in(tier, needs)


# Per configuration object (immutable; a process has one, tests a few): id → (config, chains).
_RESOLVED: dict[int, tuple[TierqConfig, dict[str, Chain]]] = {}


def _chains(config: TierqConfig) -> dict[str, Chain]:
    """Every route's chain under each of its names."""
    found = _RESOLVED.get(id(config))
    if found is None or found[0] is not config:
        if len(_RESOLVED) > 64:
            _RESOLVED.clear()
        found = _RESOLVED[id(config)] = (config, _resolve_all(config))
    return found[1]


def _resolve_all(config: TierqConfig) -> dict[str, Chain]:
    tiers = {tier.name: tier for tier in config.tiers}
    if not config.routes:
        steps = tuple(_step(config, StepConfig(tier=name)) for name in config.tier_names)
        return {DEFAULT_ROUTE: Chain(DEFAULT_ROUTE, steps, tiers)}
    chains = {}
    for route in config.routes:
        chain = Chain(route.model, tuple(_step(config, s) for s in route.chain), tiers)
        chains.update(dict.fromkeys(route.names, chain))
    return chains


def _step(config: TierqConfig, step: StepConfig) -> Step:
    tier = config.tier(step.tier)
    return Step(tier, step.degrade or tier.degrade, frozenset(step.escalate_on), step.call_timeout)


def resolve(config: TierqConfig, model: str) -> Chain:
    """The chain a request for ``model`` runs down; ModelNotFound if no route serves it."""
    chains = _chains(config)
    if not config.routes:
        return chains[DEFAULT_ROUTE]
    chain = chains.get(model) or chains.get(config.default_route or "")
    if chain is None:
        raise ModelNotFound(model)
    return chain


def of_job(config: TierqConfig, route: str | None) -> Chain:
    """A job's chain, by the route name it was accepted with (None: from before routes, or
    a route since removed from the configuration: the first route)."""
    chains = _chains(config)
    if route is not None and route in chains:
        return chains[route]
    return next(iter(chains.values()))


def listed(config: TierqConfig) -> list[Chain]:
    """Each route once, in the configuration's order."""
    return list({id(c): c for c in _chains(config).values()}.values())
