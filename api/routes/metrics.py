"""GET /metrics: Prometheus text format, read from the database at scrape time.

The page holds counts and backend and tier names, never request content or keys. By
default it needs no key (Prometheus scrapers conventionally carry none: guard it with the
network policy of the rest of the monitoring stack); with ``TIERQ_METRICS_KEY`` set, a
scrape must send it as a bearer token (Prometheus: ``authorization: {credentials: ...}``).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.openapi_responses import errors
from api.problems import Problem
from tierq.metrics import make_registry
from tierq.settings import get_settings

router = APIRouter(tags=["metrics"])


def _registry(request: Request) -> CollectorRegistry:
    # Built on first scrape: the app's tier configuration decides the queues and SLA tiers.
    # Two concurrent first scrapes may each build one; the loser is simply dropped.
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = make_registry(request.app.state.tier_config)
        request.app.state.metrics_registry = registry
    return registry


def _check_key(request: Request) -> None:
    key = get_settings().metrics_key.get_secret_value()
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Compared in constant time: the key is the only thing between a scraper and the page.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise Problem(
            401,
            "Unauthorized",
            "Send the metrics key (TIERQ_METRICS_KEY) as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **errors(401),
    },
)
def metrics(request: Request) -> Response:
    # A plain `def`: FastAPI runs it in its threadpool, so the queries never block the loop.
    _check_key(request)
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)
