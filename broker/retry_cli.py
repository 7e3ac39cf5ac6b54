"""``molar-llm retry``: re-queue failed jobs chosen by batch, capability, error code and time.

It works on the database and the queue directly (an operator tool, like ``migrate``) and
returns the lines the command prints: one per re-queued job, then a count.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session, sessionmaker

from broker.capabilities import is_capability, unknown_capability_message
from broker.control import RETRYABLE_BY_HAND, requeue
from broker.db import make_engine, make_sessionmaker, utcnow
from broker.models import Job
from broker.settings import Settings
from tasks.app import create_celery_app

AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
AGE_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_moment(text: str, *, option: str) -> datetime:
    """An ISO 8601 time (UTC when it names no zone) or an age such as ``90m`` or ``1h``."""
    match = AGE.match(text.strip())
    if match:
        return utcnow() - timedelta(seconds=float(match[1]) * AGE_UNITS_S[match[2]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{option} {text!r} is neither an ISO 8601 time nor an age like 30m, 1h or 2d"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


@dataclass(frozen=True)
class RetryFilter:
    org: str | None = None
    batch: str | None = None
    capability: str | None = None
    error_code: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_cancelled: bool = False

    @classmethod
    def parse(cls, *, org: str | None, batch: str | None, capability: str | None,
              error_code: str | None, since: str | None, until: str | None,
              include_cancelled: bool) -> RetryFilter:
        if capability is not None and not is_capability(capability):
            raise ValueError(f"--capability: {unknown_capability_message(capability)}")
        return cls(
            org=org, batch=batch, capability=capability, error_code=error_code,
            since=parse_moment(since, option="--since") if since else None,
            until=parse_moment(until, option="--until") if until else None,
            include_cancelled=include_cancelled,
        )

    @property
    def statuses(self) -> tuple[str, ...]:
        return RETRYABLE_BY_HAND if self.include_cancelled else ("failed",)

    def conditions(self) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        if self.org:
            found.append(Job.org_id == self.org)
        if self.batch:
            found.append(Job.batch_id == self.batch)
        if self.capability:
            found.append(Job.capability == self.capability)
        if self.error_code:
            found.append(Job.error["code"].as_string() == self.error_code)
        if self.since:
            found.append(Job.finished_at >= self.since)
        if self.until:
            found.append(Job.finished_at < self.until)
        return found


def run_retry(settings: Settings, where: RetryFilter, *, dry_run: bool) -> Iterator[str]:
    engine = make_engine(settings.resolved_database_url, pool_size=2, max_overflow=2)
    sessions = make_sessionmaker(engine)
    try:
        if dry_run:
            yield from _preview(sessions, where)
            return
        jobs = requeue(sessions, create_celery_app(settings), where.conditions(),
                       statuses=where.statuses)
        for job in jobs:
            yield (f"requeued {job.id} org={job.org_id} capability={job.capability} "
                   f"batch={job.batch_id or '-'} error={job.error_code or '-'}")
        yield f"re-queued {len(jobs)} job(s)"
    finally:
        engine.dispose()


def _preview(sessions: sessionmaker[Session], where: RetryFilter) -> Iterator[str]:
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.org_id, Job.capability, Job.batch_id, Job.error)
            .where(*where.conditions(), Job.status.in_(where.statuses))
            .order_by(Job.finished_at)
        ).all()
    for row in rows:
        code = (row.error or {}).get("code")
        yield (f"would requeue {row.id} org={row.org_id} capability={row.capability} "
               f"batch={row.batch_id or '-'} error={code or '-'}")
    yield f"would re-queue {len(rows)} job(s) (dry run)"
