"""Flower, unmodified, runs against tierq's broker and shows its tier queues and workers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.deployment import deployment
from tests.services import free_port, wait_until

pytestmark = pytest.mark.slow


def test_flower_shows_tier_queues_workers_and_tasks(tmp_path: Path) -> None:
    with deployment(tmp_path) as d:
        d.stack.api()
        d.stack.worker("gpu")
        port = free_port()
        flower = d.stack.spawn("flower", "flower", "--port", str(port))
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthcheck", timeout=1).text == "OK"
            except httpx.HTTPError:
                return False

        wait_until(lambda: up() or not flower.alive(), 30, 0.2, what="flower")
        assert flower.alive(), flower.output()
        with d.client() as client:
            job = d.submit(client).json()
            client.get(f"/v1/jobs/{job['id']}", params={"wait": 20})
        wanted = ('flower_worker_online{worker="gpu-', 'flower_events_total{task="tierq.run_job"')

        def shown() -> bool:
            metrics = httpx.get(f"{base}/metrics").text
            return all(w in metrics for w in wanted)

        wait_until(shown, 30, 0.5, what="flower to show the worker and its task events")
        # The broker page lists the queues that live workers consume, with their lengths.
        wait_until(
            lambda: "<td>gpu</td>" in httpx.get(f"{base}/broker").text.replace(" ", ""),
            30,
            1,
            what="flower's broker page to list the gpu queue",
        )
