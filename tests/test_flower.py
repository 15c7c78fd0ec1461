"""Flower, unmodified, runs against tierq's broker and shows its tier queues and workers."""

from __future__ import annotations

import time
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
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{base}/metrics").text
            if "tierq.run_job" in metrics and 'worker="gpu@' in metrics:
                break
            time.sleep(0.5)
        assert 'flower_worker_online{worker="gpu@' in metrics
        assert 'flower_events_total{task="tierq.run_job"' in metrics
        broker_page = httpx.get(f"{base}/broker").text
        assert "gpu" in broker_page
