"""What the job runner tells operators: Prometheus samples and structured log fields.

The runner calls these at each state change, so the counting rules live in one place and
the runner keeps reading as the job's story. Nothing here touches the request, the result
or a credential.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from broker import prometheus as prom
from broker.db import utcnow
from broker.routing import Route

SPEND_CAP_CODE = "spend_cap_exceeded"


class JobLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def org_id(self) -> str: ...
    @property
    def capability(self) -> str: ...
    @property
    def route(self) -> Route: ...
    @property
    def attempt(self) -> int: ...
    @property
    def created_at(self) -> datetime | None: ...


def log_fields(job: JobLike, status: str, duration_ms: float | None = None,
               **more: Any) -> dict[str, Any]:
    """``extra=`` fields of a job state-change line (JSON logs carry them as keys)."""
    fields: dict[str, Any] = {
        "job_id": job.id,
        "org_id": job.org_id,
        "capability": job.capability,
        "attempt": job.attempt,
        "route": f"{job.route.provider_integration_id}/{job.route.model}",
        "job_status": status,
    }
    if duration_ms is not None:
        fields["duration_ms"] = round(duration_ms, 1)
    fields.update(more)
    return fields


def _labels(job: JobLike) -> tuple[str, str, str]:
    return (prom.label(job.capability), prom.label(job.route.model),
            prom.label(job.route.billing_kind))


@contextmanager
def running(job: JobLike) -> Iterator[None]:
    """Count the job in flight while its attempt runs; note retries and the first wait."""
    labels = _labels(job)
    if job.attempt > 1:
        prom.RETRIES.labels(*labels).inc()
    elif job.created_at is not None:
        prom.QUEUE_WAIT.labels(*labels).observe(_seconds_since(job.created_at))
    with prom.IN_FLIGHT.labels(labels[0]).track_inprogress():
        yield


def attempt_succeeded(job: JobLike, elapsed_ms: float, *, input_tokens: int,
                      cached_input_tokens: int, output_tokens: int, cost_usd: Decimal) -> None:
    labels = _labels(job)
    _attempt(labels, "succeeded", elapsed_ms)
    prom.TOKENS.labels(*labels, "input").inc(input_tokens)
    prom.TOKENS.labels(*labels, "cached_input").inc(cached_input_tokens)
    prom.TOKENS.labels(*labels, "output").inc(output_tokens)
    prom.COST.labels(*labels).inc(float(cost_usd))
    job_finished(job, "succeeded")


def attempt_failed(job: JobLike, elapsed_ms: float, code: str) -> None:
    labels = _labels(job)
    _attempt(labels, "failed", elapsed_ms)
    prom.ERRORS.labels(*labels, prom.label(code)).inc()
    if code == SPEND_CAP_CODE:
        prom.SPEND_CAP_REFUSALS.labels("dispatch").inc()


def job_finished(job: JobLike, outcome: str) -> None:
    """The job reached a final state (succeeded, or failed with no attempt left)."""
    labels = _labels(job)
    prom.JOBS_FINISHED.labels(*labels, outcome).inc()
    if job.created_at is not None:
        prom.JOB_DURATION.labels(*labels, outcome).observe(_seconds_since(job.created_at))


def _attempt(labels: tuple[str, str, str], outcome: str, elapsed_ms: float) -> None:
    prom.REQUESTS.labels(*labels, outcome).inc()
    prom.PROVIDER_LATENCY.labels(*labels, outcome).observe(elapsed_ms / 1000)


def _seconds_since(moment: datetime) -> float:
    return max((utcnow() - moment).total_seconds(), 0.0)
