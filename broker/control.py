"""Operator and caller control over jobs that exist: manual retry, cancel, the attempt log.

A manual retry re-queues failed (or cancelled) jobs as a new attempt with a fresh retry
budget. Cancel ends queued and waiting jobs at once, without a provider call; a running
attempt is left to finish within its deadline and its job then ends ``succeeded`` (the
answer is kept) or ``cancelled`` (instead of retrying). A batch passes through
``cancelling`` to ``cancelled`` once nothing of it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from broker.db import run_transaction, transaction, utcnow
from broker.errors import Conflict, NotFound
from broker.jobs import PUBLISH_ERRORS, JobService
from broker.models import Attempt, Batch, Job
from broker.sqlutil import checked_on_row
from broker.views import iso
from tasks.publish import publish_jobs

log = logging.getLogger(__name__)
RETRYABLE_BY_HAND = ("failed", "cancelled")
WAITING = ("queued", "retrying")
CANCELLED_ERROR = {
    "code": "job_cancelled", "message": "cancelled before a provider call was made",
    "provider_status": None, "retryable": False,
}


@dataclass(frozen=True)
class RequeuedJob:
    id: str
    org_id: str
    capability: str
    batch_id: str | None
    error_code: str | None


def requeue(sessions: sessionmaker[Session], celery_app: Celery,
            conditions: Sequence[ColumnElement[bool]], *,
            statuses: Sequence[str] = RETRYABLE_BY_HAND) -> list[RequeuedJob]:
    """Re-queue the jobs matching ``conditions`` as new attempts and publish them."""
    jobs = run_transaction(sessions, lambda session: requeue_rows(session, conditions, statuses))
    publish_or_defer(sessions, celery_app, jobs)
    return jobs


def requeue_rows(session: Session, conditions: Sequence[ColumnElement[bool]],
                 statuses: Sequence[str]) -> list[RequeuedJob]:
    before = select(Job.id, Job.error).where(*conditions, Job.status.in_(statuses))
    codes = {row.id: (row.error or {}).get("code") for row in session.execute(before)}
    rows = session.execute(
        update(Job).where(Job.id.in_(list(codes)), checked_on_row(Job.status.in_(statuses)))
        .values(status="queued", error=None, finished_at=None, due_at=None, published_at=None,
                cancel_requested=False, attempt_floor=Job.attempts, lease_owner=None,
                lease_expires_at=None)
        .returning(Job.id, Job.org_id, Job.capability, Job.batch_id)
        .execution_options(synchronize_session=False)
    ).all()
    return [RequeuedJob(r.id, r.org_id, r.capability, r.batch_id, codes.get(r.id))
            for r in rows]


def publish_or_defer(sessions: sessionmaker[Session], celery_app: Celery,
                     jobs: Sequence[RequeuedJob]) -> None:
    """Publish; with the broker down, leave the jobs to the scheduler instead of failing."""
    if not jobs:
        return
    try:
        publish_jobs(celery_app, [(job.id, job.capability) for job in jobs])
    except PUBLISH_ERRORS as exc:
        log.warning("publishing %d re-queued job(s) failed (%s); the scheduler publishes "
                    "them when the broker is back", len(jobs), type(exc).__name__)
        with transaction(sessions) as session:
            session.execute(
                update(Job).where(Job.id.in_([job.id for job in jobs]),
                                  checked_on_row(Job.status == "queued"))
                .values(status="retrying", due_at=utcnow())
                .execution_options(synchronize_session=False)
            )


class JobControl:
    def __init__(self, sessions: sessionmaker[Session], celery_app: Celery, jobs: JobService):
        self._sessions = sessions
        self._celery = celery_app
        self._jobs = jobs

    # -- jobs ---------------------------------------------------------------------------

    def retry_job(self, org_id: str, job_id: str) -> dict[str, Any]:
        done = requeue(self._sessions, self._celery, [Job.id == job_id, Job.org_id == org_id])
        if not done:
            status = self._status(org_id, job_id)
            raise Conflict(
                f"job {job_id} is {status}; only failed or cancelled jobs can be retried",
                param="job_id", code="job_not_retryable",
            )
        log.info("job %s queued by manual retry org=%s", job_id, org_id)
        return self._jobs.get_job(org_id, job_id)

    def cancel_job(self, org_id: str, job_id: str) -> dict[str, Any]:
        mine = [Job.id == job_id, Job.org_id == org_id]

        def cancel(session: Session) -> tuple[int, int]:
            ended = _cancel_waiting(session, mine)
            return ended, 0 if ended else _flag_running(session, mine)

        ended, flagged = run_transaction(self._sessions, cancel)
        if not ended and not flagged:
            status = self._status(org_id, job_id)
            raise Conflict(f"job {job_id} is already {status}; there is nothing to cancel",
                           param="job_id", code="job_not_cancellable")
        log.info("job %s %s by request org=%s", job_id,
                 "cancelled" if ended else "cancel requested (running)", org_id)
        return self._jobs.get_job(org_id, job_id)

    def attempts(self, org_id: str, job_id: str) -> dict[str, Any]:
        self._status(org_id, job_id)
        with self._sessions() as session:
            rows = session.scalars(
                select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)
            ).all()
        return {"object": "list", "job_id": job_id, "data": [_attempt_view(a) for a in rows]}

    def _status(self, org_id: str, job_id: str) -> str:
        with self._sessions() as session:
            row = session.execute(
                select(Job.status).where(Job.id == job_id, Job.org_id == org_id)
            ).one_or_none()
        if row is None:
            raise NotFound(f"no job {job_id!r} in this org", param="job_id")
        return str(row.status)

    # -- batches ------------------------------------------------------------------------

    def retry_batch(self, org_id: str, batch_id: str) -> dict[str, Any]:
        status = self._batch_status(org_id, batch_id)
        if status == "cancelling":
            raise Conflict(f"batch {batch_id} is cancelling; retry it once it is cancelled",
                           param="batch_id", code="batch_not_retryable")
        def requeue_failed(session: Session) -> list[RequeuedJob]:
            jobs = requeue_rows(session, [Job.batch_id == batch_id], ("failed",))
            if jobs:
                session.execute(update(Batch).where(Batch.id == batch_id)
                                .values(status="in_progress", completed_at=None))
            return jobs

        jobs = run_transaction(self._sessions, requeue_failed)
        publish_or_defer(self._sessions, self._celery, jobs)
        log.info("batch %s re-queued %d failed item(s) org=%s", batch_id, len(jobs), org_id)
        return dict(self._jobs.get_batch(org_id, batch_id), requeued=len(jobs))

    def cancel_batch(self, org_id: str, batch_id: str) -> dict[str, Any]:
        status = self._batch_status(org_id, batch_id)
        if status == "completed":
            raise Conflict(f"batch {batch_id} is completed; there is nothing to cancel",
                           param="batch_id", code="batch_not_cancellable")
        in_batch = [Job.batch_id == batch_id]

        def cancel(session: Session) -> tuple[int, int]:
            session.execute(update(Batch).where(Batch.id == batch_id,
                                                Batch.status == "in_progress")
                            .values(status="cancelling"))
            return _cancel_waiting(session, in_batch), _flag_running(session, in_batch)

        ended, flagged = run_transaction(self._sessions, cancel)
        log.info("batch %s cancelling org=%s cancelled=%d running=%d", batch_id, org_id, ended,
                 flagged)
        return self._jobs.get_batch(org_id, batch_id)

    def _batch_status(self, org_id: str, batch_id: str) -> str:
        with self._sessions() as session:
            batch = session.get(Batch, batch_id)
        if batch is None or batch.org_id != org_id:
            raise NotFound(f"no batch {batch_id!r} in this org", param="batch_id")
        return batch.status


def _cancel_waiting(session: Session, conditions: Sequence[ColumnElement[bool]]) -> int:
    """Queued and waiting jobs, and running ones whose worker is gone, end cancelled now."""
    now = utcnow()
    waiting = or_(Job.status.in_(WAITING),
                  and_(Job.status == "running", Job.lease_expires_at < now))
    result = session.execute(
        update(Job).where(*conditions, waiting)
        .values(status="cancelled", finished_at=utcnow(), due_at=None, published_at=None,
                error=CANCELLED_ERROR)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _flag_running(session: Session, conditions: Sequence[ColumnElement[bool]]) -> int:
    result = session.execute(
        update(Job).where(*conditions, Job.status == "running").values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _attempt_view(attempt: Attempt) -> dict[str, Any]:
    started: datetime | None = attempt.started_at
    return {
        "number": attempt.number,
        "worker": attempt.worker,
        "started_at": iso(started),
        "finished_at": iso(attempt.finished_at),
        "outcome": attempt.outcome,
        "provider_status": attempt.provider_status,
        "latency_ms": None if attempt.latency_ms is None else float(attempt.latency_ms),
        "error_code": attempt.error_code,
    }
