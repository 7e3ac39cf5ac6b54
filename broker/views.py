"""JSON views of jobs and batches, as the API returns them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from broker.db import as_utc
from broker.models import Batch, Job

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
COUNT_KEYS = ("queued", "running", "succeeded", "failed", "cancelled")
# Statuses folded into a request_counts bucket; the buckets always add up to total.
COUNT_BUCKET = {"retrying": "queued", "queued": "queued", "running": "running",
                "succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}


def iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value else None


def job_view(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "llm.job",
        "status": job.status,
        "capability": job.capability,
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "run_id": job.run_id,
        "route": job.route,
        "attempts": job.attempts,
        "next_attempt_at": iso(job.due_at) if job.status == "retrying" else None,
        "result": job.result,
        "error": job.error,
        "usage": job.usage,
        "metadata": job.meta,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def result_line(job: Job) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": job.custom_id,
        "job_id": job.id,
        "capability": job.capability,
        "status": job.status,
    }
    if job.status == "succeeded":
        line["result"] = job.result
    else:
        line["error"] = job.error
    line.update(
        usage=job.usage, route=job.route, attempts=job.attempts,
        created_at=iso(job.created_at), started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
    )
    return line


def batch_view(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "llm.batch",
        "status": batch.status,
        "run_id": batch.run_id,
        "request_counts": {"total": batch.total, **counts},
        "metadata": batch.meta,
        "created_at": iso(batch.created_at),
        "completed_at": iso(batch.completed_at),
    }


def bucket_counts(rows: list[tuple[str, int]]) -> dict[str, int]:
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for status, n in rows:
        counts[COUNT_BUCKET[status]] += n
    return counts
