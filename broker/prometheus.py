"""Prometheus series of the API and the workers, and how each process exposes them.

Labels carry only deployment vocabulary (capability, catalog model, billing kind, outcome,
our own error codes, route templates): never an org id, a key or request text. A process
started with ``PROMETHEUS_MULTIPROC_DIR`` writes its samples there, and any process of the
same host renders all of them (prometheus-client's multiprocess mode); otherwise the API
serves ``/metrics`` on its port and a worker on ``--metrics-port``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
JOB_LABELS = ("capability", "model", "billing_kind")
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SAFE_LABEL = re.compile(r"^[A-Za-z0-9_.:/{}-]{1,96}$")

# -- worker side: one sample per provider call and per finished job -------------------------

REQUESTS = Counter("molar_llm_requests", "Provider calls by outcome.", [*JOB_LABELS, "outcome"])
ERRORS = Counter("molar_llm_errors", "Failed provider calls by the broker's error code.",
                 [*JOB_LABELS, "code"])
PROVIDER_LATENCY = Histogram(
    "molar_llm_provider_latency_seconds", "Duration of one provider call.",
    [*JOB_LABELS, "outcome"], buckets=LATENCY_BUCKETS_S,
)
JOB_DURATION = Histogram(
    "molar_llm_job_duration_seconds", "Job submission to final state (end to end).",
    [*JOB_LABELS, "outcome"], buckets=LATENCY_BUCKETS_S,
)
QUEUE_WAIT = Histogram(
    "molar_llm_queue_wait_seconds", "Job submission to its first claim by a worker.",
    JOB_LABELS, buckets=LATENCY_BUCKETS_S,
)
JOBS_FINISHED = Counter("molar_llm_jobs_finished", "Jobs that reached a final state.",
                        [*JOB_LABELS, "outcome"])
TOKENS = Counter("molar_llm_tokens", "Tokens metered, by kind (input, cached_input, output).",
                 [*JOB_LABELS, "kind"])
COST = Counter("molar_llm_cost_usd", "Cost metered in US dollars.", JOB_LABELS)
RETRIES = Counter("molar_llm_retries", "Attempts after a job's first.", JOB_LABELS)
IN_FLIGHT = Gauge("molar_llm_jobs_in_flight", "Jobs a worker is running now.", ["capability"],
                  multiprocess_mode="livesum")

# -- both sides -------------------------------------------------------------------------------

SPEND_CAP_REFUSALS = Counter(
    "molar_llm_spend_cap_refusals", "Work refused because the org's hosted spend cap is reached.",
    ["stage"],
)

# -- API side ---------------------------------------------------------------------------------

HTTP_REQUESTS = Counter("molar_llm_http_requests", "API requests by route template and status.",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("molar_llm_http_request_duration_seconds", "API request duration.",
                         ["method", "route"], buckets=LATENCY_BUCKETS_S)


def label(value: str | None) -> str:
    """A label value, or ``other`` for anything outside the safe vocabulary."""
    return value if value and SAFE_LABEL.match(value) else "other"


class QueueDepthCollector(Collector):
    """``molar_llm_queue_depth{capability}`` from depths read at scrape time."""

    def __init__(self, depths: Mapping[str, int]):
        self._depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("molar_llm_queue_depth",
                                   "Messages waiting on each capability queue.",
                                   labels=["capability"])
        for capability, depth in sorted(self._depths.items()):
            family.add_metric([capability], depth)
        yield family


def render(queue_depths: Mapping[str, int] | None) -> bytes:
    """The exposition text of this process (or of every process, in multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    if queue_depths is not None:
        extra = CollectorRegistry(auto_describe=False)
        extra.register(QueueDepthCollector(queue_depths))
        body += generate_latest(extra)
    return body


def serve_worker_metrics(port: int, address: str = "0.0.0.0") -> None:
    """Expose this worker process's series on ``address:port`` from a background thread."""
    start_http_server(port, addr=address)


class HttpMetricsMiddleware:
    """Counts API requests by route template (never the raw path, which holds ids)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._observe(scope, status, time.perf_counter() - started)

    @staticmethod
    def _observe(scope: Scope, status: int, elapsed_s: float) -> None:
        route = scope.get("route")
        template = label(getattr(route, "path", None)) if route is not None else "unmatched"
        method = label(scope.get("method"))
        HTTP_REQUESTS.labels(method, template, str(status)).inc()
        HTTP_LATENCY.labels(method, template).observe(elapsed_s)
        if status == 402:
            SPEND_CAP_REFUSALS.labels("submission").inc()
