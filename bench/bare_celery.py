"""The baseline: a bare Celery task making the same HTTP call, as in shared/BASELINES.md.

Late acknowledgement, prefetch 1, a Redis result backend, one pooled httpx client per
worker process. Configured from ``BARE_BROKER_URL`` and ``BARE_UPSTREAM_URL``.
"""

from __future__ import annotations

import os

import httpx
from celery import Celery

app = Celery(
    "bare",
    broker=os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/14"),
    backend=os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/14"),
)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue="bare",
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)
_client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=256))


@app.task(name="bare.call_upstream")
def call_upstream(n: int) -> int:
    response = _client.post(
        os.environ["BARE_UPSTREAM_URL"] + "/v1/chat/completions",
        headers={"Authorization": "Bearer " + os.environ.get("BARE_UPSTREAM_KEY", "k")},
        json={"model": "gpt-4.1-mini",
              "messages": [{"role": "user", "content": f"bench job {n}"}]},
    )
    response.raise_for_status()
    return int(response.json()["usage"]["total_tokens"])
