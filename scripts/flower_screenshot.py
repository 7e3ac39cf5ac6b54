"""Take docs/flower-dashboard.png and docs/flower-broker.png during a demo run.

Runs the demo's Cartographer-style batch on Redis and PostgreSQL through three worker
groups (text, vision, embeddings) with Flower beside them, and photographs Flower's
dashboard and broker tab with headless Chromium while the batch is in flight.

    .venv/bin/python scripts/flower_screenshot.py      # needs Redis, PostgreSQL, chromium
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from broker.client import BrokerClient
from broker.demo import DEMO_ORG, demo_items
from broker.devstack import LocalStack, free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
GROUPS = {
    "text": "planner,grounding_tier0,export_generator,export_healer,stagehand_planner",
    "vision": "grounding_tier1_vlm,passive_ux_vlm,stagehand_vlm",
    "embeddings": "embeddings",
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                  "--virtual-time-budget=4000"]


def screenshot(url: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--screenshot={out}", url], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"wrote {out}")


def main() -> int:
    database = f"molar_flower_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    password = secrets.token_hex(12)
    env = {
        "MOLAR_LLM_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{database}",
        "MOLAR_LLM_BROKER_URL": "redis://127.0.0.1:6379/15",
        "MOLAR_LLM_REDIS_KEY_PREFIX": f"shot{secrets.token_hex(3)}:",
        "MOLAR_LLM_FLOWER_BASIC_AUTH": f"ops:{password}",
    }
    try:
        with LocalStack(ROOT / "var" / "flower-shot", env=env, upstream_latency_ms=600) as stack:
            run(stack, password)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return 0


def run(stack: LocalStack, password: str) -> None:
    assert stack.molar("migrate", "migrate").wait(timeout=120) == 0
    stack.start_upstream()
    api_url = stack.start_api()
    for group, caps in GROUPS.items():
        stack.molar(f"worker-{group}", "worker", "--capabilities", caps, "--concurrency", "16")
    port = free_port()
    stack.molar("flower", "flower", "--port", str(port))
    flower = f"http://127.0.0.1:{port}"
    wait_http(f"{flower}/api/workers", expect=401, timeout_s=60)
    with BrokerClient(api_url, service_key=stack.env.get("MOLAR_LLM_SERVICE_KEY",
                                                          "dev-molar-llm-service-key"),
                      org_id=DEMO_ORG) as client:
        batch = client.submit_batch(demo_items(1200), run_id="flower-screenshot")
        wait_for_workers(flower, password)
        time.sleep(8)  # let tasks flow so the dashboard shows live counts
        authed = f"http://ops:{password}@127.0.0.1:{port}"
        screenshot(f"{authed}/", ROOT / "docs" / "flower-dashboard.png")
        screenshot(f"{authed}/broker", ROOT / "docs" / "flower-broker.png")
        final = client.wait_batch(batch["id"], poll_s=1, timeout_s=900)
    print(f"batch {final['status']}: {final['request_counts']}")


def wait_for_workers(flower: str, password: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = httpx.get(f"{flower}/api/workers", params={"refresh": "1"},
                            auth=("ops", password), timeout=30).json()
        if len(workers) >= len(GROUPS):
            return
        time.sleep(1)
    raise TimeoutError("Flower did not see every worker group")


if __name__ == "__main__":
    sys.exit(main())
