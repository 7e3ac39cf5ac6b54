"""Run one job: claim it, resolve route and credential, call the provider, write back.

The Celery task is a thin shell around :meth:`JobRunner.run`; everything that decides a
job's fate lives here so it reads top to bottom in one place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, update
from sqlalchemy.orm import Session, sessionmaker

from broker.capabilities import EMBEDDING_CAPABILITIES
from broker.db import as_utc, utcnow
from broker.metering import estimate_input_tokens, estimate_output_tokens, meter
from broker.models import Attempt, Job, UsageEvent
from broker.routing import Deployment, Route
from broker.sqlutil import insert_ignoring_conflicts
from workers import observe
from workers.credentials import CredentialResolver
from workers.errors import PermanentProviderError, ProviderError
from workers.group_commit import GroupCommitter
from workers.providers.base import CallKind, Provider, ProviderResponse
from workers.redaction import redact

log = logging.getLogger(__name__)

CLAIMABLE = ("queued", "retrying")
# A lease outlives the attempt deadline by this much before another worker may take over.
LEASE_MARGIN_S = 30


# Built once: executing a prepared construct skips statement building and cache-key work,
# which dominated the worker's CPU per job.
CLAIM = (
    update(Job)
    .where(
        Job.id == bindparam("job_id"),
        or_(
            Job.status.in_(CLAIMABLE),
            # The worker holding it died: its lease ran out.
            and_(Job.status == "running", Job.lease_expires_at < bindparam("now")),
        ),
    )
    .values(
        status="running",
        attempts=Job.attempts + 1,
        started_at=func.coalesce(Job.started_at, bindparam("now")),
        lease_owner=bindparam("worker"),
        lease_expires_at=bindparam("lease_expires_at"),
    )
    .returning(Job.org_id, Job.run_id, Job.capability, Job.request, Job.route, Job.attempts,
               Job.created_at)
)
FINISH = (
    update(Job)
    .where(Job.id == bindparam("job_id"), Job.attempts == bindparam("attempt"),
           Job.status == "running")
    .values(status=bindparam("status"), result=bindparam("result"), usage=bindparam("usage"),
            error=bindparam("error"), finished_at=bindparam("finished_at"), lease_owner=None,
            lease_expires_at=None)
)


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    org_id: str
    run_id: str | None
    capability: str
    request: dict[str, Any]
    route: Route
    attempt: int
    created_at: datetime | None = None


class JobRunner:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        deployment: Deployment,
        providers: dict[str, Provider],
        credentials: CredentialResolver,
        worker_name: str,
        attempt_deadline_s: float,
    ):
        self._sessions = sessions
        self._commits = GroupCommitter(sessions)
        self._deployment = deployment
        self._providers = providers
        self._credentials = credentials
        self._worker = worker_name
        self._deadline_s = attempt_deadline_s

    def close(self) -> None:
        self._commits.close()

    def run(self, job_id: str) -> None:
        job = self._claim(job_id)
        if job is None:
            log.info("job %s dropped: not claimable (terminal, running elsewhere or unknown)",
                     job_id, extra={"job_id": job_id, "job_status": "dropped"})
            return
        log.info("job %s running attempt=%d org=%s capability=%s route=%s/%s", job.id,
                 job.attempt, job.org_id, job.capability, job.route.provider_integration_id,
                 job.route.model, extra=observe.log_fields(job, "running"))
        started = time.perf_counter()
        with observe.running(job):
            try:
                response = self._call(job)
            except ProviderError as exc:
                self._fail(job, exc, (time.perf_counter() - started) * 1000)
                return
            self._succeed(job, response, (time.perf_counter() - started) * 1000)

    def _claim(self, job_id: str) -> ClaimedJob | None:
        now = utcnow()
        params = {
            "job_id": job_id, "now": now, "worker": self._worker,
            "lease_expires_at": now + timedelta(seconds=self._deadline_s + LEASE_MARGIN_S),
        }
        row = self._commits.run(
            lambda session: session.connection().execute(CLAIM, params).one_or_none()
        )
        if row is None:
            return None
        route = Route(**row.route)
        return ClaimedJob(job_id, row.org_id, row.run_id, row.capability, row.request, route,
                          row.attempts, as_utc(row.created_at))

    def _call(self, job: ClaimedJob) -> ProviderResponse:
        # A stored integration names its own provider and base URL; the catalog's provider
        # applies to molar-managed routes only.
        credential = self._credentials.resolve(
            job.org_id, job.route.provider_integration_id, job.route.provider
        )
        provider = self._providers.get(credential.provider)
        if provider is None:
            raise PermanentProviderError(
                f"provider {credential.provider!r} of integration "
                f"{credential.integration_id!r} is not served by this worker; supported: "
                f"{', '.join(sorted(self._providers))}",
                code="provider_unsupported",
            )
        kind: CallKind = "embedding" if job.capability in EMBEDDING_CAPABILITIES else "chat"
        try:
            return provider.call(kind, job.request, model=job.route.model,
                                 credential=credential, deadline_s=self._deadline_s)
        except ProviderError as exc:
            exc.message = redact(exc.message, [credential.api_key,
                                               *self._credentials.live_secrets()])
            raise

    def _succeed(self, job: ClaimedJob, response: ProviderResponse, elapsed_ms: float) -> None:
        now = utcnow()
        model = self._deployment.catalog.get(job.route.model)
        if response.usage is not None:
            usage = meter(model, now, input_tokens=response.usage.input_tokens,
                          cached_input_tokens=response.usage.cached_input_tokens,
                          output_tokens=response.usage.output_tokens)
        else:
            # Until every provider reports usage, an estimate (flagged) beats a zero bill.
            usage = meter(model, now, input_tokens=estimate_input_tokens(job.request),
                          cached_input_tokens=0,
                          output_tokens=estimate_output_tokens(response.body), estimated=True)
        def write(session: Session) -> None:
            insert_ignoring_conflicts(session, UsageEvent.__table__, {  # type: ignore[arg-type]
                "org_id": job.org_id, "run_id": job.run_id, "job_id": job.id,
                "attempt": job.attempt, "capability": job.capability,
                "integration_id": job.route.provider_integration_id,
                "billing_kind": job.route.billing_kind, "provider": job.route.provider,
                "model": job.route.model, "input_tokens": usage.input_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "output_tokens": usage.output_tokens, "cost_usd": usage.cost_usd,
                "meters": usage.meters, "estimated": usage.estimated, "created_at": now,
            }, ("job_id", "attempt"))
            self._record_attempt(session, job, "succeeded", response.status, elapsed_ms, None)
            self._finish(session, job, status="succeeded", result=response.body,
                         usage=usage.to_dict(), error=None)

        self._commits.run(write)
        log.info("job %s succeeded attempt=%d duration_ms=%.1f tokens_in=%d tokens_out=%d",
                 job.id, job.attempt, elapsed_ms, usage.input_tokens, usage.output_tokens,
                 extra=observe.log_fields(job, "succeeded", elapsed_ms))
        observe.attempt_succeeded(job, elapsed_ms, input_tokens=usage.input_tokens,
                                  cached_input_tokens=usage.cached_input_tokens,
                                  output_tokens=usage.output_tokens, cost_usd=usage.cost_usd)

    def _fail(self, job: ClaimedJob, exc: ProviderError, elapsed_ms: float) -> None:
        def write(session: Session) -> None:
            self._record_attempt(session, job, "failed", exc.status, elapsed_ms, exc.code)
            self._finish(session, job, status="failed", result=None, usage=None,
                         error=exc.to_error())

        self._commits.run(write)
        log.warning("job %s failed attempt=%d duration_ms=%.1f code=%s status=%s", job.id,
                    job.attempt, elapsed_ms, exc.code, exc.status,
                    extra=observe.log_fields(job, "failed", elapsed_ms, code=exc.code,
                                             provider_status=exc.status))
        observe.attempt_failed(job, elapsed_ms, exc.code)
        observe.job_finished(job, "failed")

    def _record_attempt(self, session: Session, job: ClaimedJob, outcome: str,
                        provider_status: int | None, elapsed_ms: float,
                        error_code: str | None) -> None:
        now = utcnow()
        insert_ignoring_conflicts(session, Attempt.__table__, {  # type: ignore[arg-type]
            "job_id": job.id, "number": job.attempt, "worker": self._worker,
            "started_at": now - timedelta(milliseconds=elapsed_ms), "finished_at": now,
            "outcome": outcome, "provider_status": provider_status,
            "latency_ms": round(elapsed_ms, 3), "error_code": error_code,
        }, ("job_id", "number"))

    def _finish(self, session: Session, job: ClaimedJob, *, status: str,
                result: dict[str, Any] | None, usage: dict[str, Any] | None,
                error: dict[str, Any] | None) -> None:
        session.connection().execute(FINISH, {
            "job_id": job.id, "attempt": job.attempt, "status": status, "result": result,
            "usage": usage, "error": error, "finished_at": utcnow(),
        })
