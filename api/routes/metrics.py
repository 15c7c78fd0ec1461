"""GET /metrics: Prometheus text format, read from the database at scrape time.

No key: Prometheus scrapers conventionally carry none, and the page holds only counts and
backend names, never request content or keys. Put it behind the network policy that guards
the rest of the monitoring stack.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tierq.metrics import make_registry

router = APIRouter(tags=["metrics"])


def _registry(request: Request) -> CollectorRegistry:
    # Built on first scrape: the app's tier configuration decides the queues and SLA tiers.
    # Two concurrent first scrapes may each build one; the loser is simply dropped.
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = make_registry(request.app.state.tier_config)
        request.app.state.metrics_registry = registry
    return registry


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    # A plain `def`: FastAPI runs it in its threadpool, so the queries never block the loop.
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)
