"""Publish jobs again when SQL says they are due: retries whose wait is over, expired leases.

Waits are held in SQL (``retrying`` with ``due_at``), never parked on the message broker, so
no wait depends on the broker's visibility timeout. Every worker process runs one
:class:`Scheduler` thread; on PostgreSQL concurrent schedulers take disjoint rows (``FOR
UPDATE SKIP LOCKED``). A duplicate publish is harmless: the runner's claim is conditional.
The same loop republishes jobs whose worker died (lease expired) and, now and then, deletes
expired idempotency keys.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from celery import Celery
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from broker.db import transaction, utcnow
from broker.models import IdempotencyKey, Job
from tasks.publish import publish_jobs

log = logging.getLogger(__name__)
#: Jobs published per round; the next round follows at once when a round was full.
ROUND_SIZE = 500
KEY_PURGE_INTERVAL_S = 600.0


def take_due(sessions: sessionmaker[Session], *, resend_s: float,
             limit: int = ROUND_SIZE) -> list[tuple[str, str]]:
    """Mark due jobs as published now and return ``(job_id, capability)`` pairs."""
    now = utcnow()
    due = or_(
        and_(Job.status == "retrying", Job.due_at <= now),
        and_(Job.status == "running", Job.lease_expires_at < now),
    )
    not_recent = or_(Job.published_at.is_(None),
                     Job.published_at < now - timedelta(seconds=resend_s))
    picked = (
        select(Job.id).where(due, not_recent).order_by(Job.due_at).limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(Job).where(Job.id.in_(picked), due, not_recent).values(published_at=now)
        .returning(Job.id, Job.capability)
        .execution_options(synchronize_session=False)
    )
    with transaction(sessions) as session:
        return [(row.id, row.capability) for row in session.execute(stmt)]


def purge_expired_keys(sessions: sessionmaker[Session]) -> int:
    with transaction(sessions) as session:
        result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow()))
    return int(getattr(result, "rowcount", 0) or 0)


class Scheduler(threading.Thread):
    """A daemon thread: every ``interval_s``, publish what is due."""

    def __init__(self, sessions: sessionmaker[Session], celery_app: Celery, *,
                 interval_s: float, resend_s: float):
        super().__init__(name="molar-llm-scheduler", daemon=True)
        self._sessions = sessions
        self._celery = celery_app
        self._interval_s = interval_s
        self._resend_s = resend_s
        self._stopping = threading.Event()
        self._next_purge = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        log.info("scheduler started interval_s=%.2f resend_s=%.1f", self._interval_s,
                 self._resend_s)
        while not self._stopping.is_set():
            try:
                full = self.tick()
            except Exception as exc:  # the loop must outlive a database or broker outage
                log.error("scheduler round failed: %s: %s", type(exc).__name__, exc)
                full = False
            if not full:
                self._stopping.wait(self._interval_s)

    def tick(self) -> bool:
        """One round; True when it was full and another should follow at once."""
        jobs = take_due(self._sessions, resend_s=self._resend_s)
        if jobs:
            publish_jobs(self._celery, jobs)
            log.info("scheduler republished %d due job(s): %s%s", len(jobs),
                     ", ".join(job_id for job_id, _ in jobs[:5]), " ..." if len(jobs) > 5 else "")
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + KEY_PURGE_INTERVAL_S
            try:
                purged = purge_expired_keys(self._sessions)
            except SQLAlchemyError as exc:
                log.warning("purging expired idempotency keys failed: %s", type(exc).__name__)
            else:
                if purged:
                    log.info("purged %d expired idempotency key(s)", purged)
        return len(jobs) >= ROUND_SIZE
