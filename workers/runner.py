"""Run one job: claim it, resolve route and credential, call the provider, write back.

The Celery task is a thin shell around :meth:`JobRunner.run`; everything that decides a
job's fate lives here so it reads top to bottom in one place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, update
from sqlalchemy.orm import Session, sessionmaker

from broker.capabilities import EMBEDDING_CAPABILITIES
from broker.db import transaction, utcnow
from broker.errors import SpendCapExceeded
from broker.metering import estimate_usage, meter
from broker.models import Attempt, Job, UsageEvent
from broker.routing import Deployment, Route
from broker.spend import SpendLedger
from broker.sqlutil import insert_ignoring_conflicts
from workers.credentials import CredentialResolver
from workers.errors import PermanentProviderError, ProviderError
from workers.providers.base import CallKind, Provider, ProviderResponse
from workers.redaction import redact

log = logging.getLogger(__name__)

CLAIMABLE = ("queued", "retrying")
# A lease outlives the attempt deadline by this much before another worker may take over.
LEASE_MARGIN_S = 30


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    org_id: str
    run_id: str | None
    capability: str
    request: dict[str, Any]
    route: Route
    attempt: int


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
        self._deployment = deployment
        self._providers = providers
        self._credentials = credentials
        self._worker = worker_name
        self._deadline_s = attempt_deadline_s
        self._spend = SpendLedger(sessions, deployment.catalog)

    def run(self, job_id: str) -> None:
        job = self._claim(job_id)
        if job is None:
            log.info("job %s dropped: not claimable (terminal, running elsewhere or unknown)",
                     job_id)
            return
        log.info("job %s running attempt=%d org=%s capability=%s route=%s/%s", job.id,
                 job.attempt, job.org_id, job.capability, job.route.provider_integration_id,
                 job.route.model)
        started = time.perf_counter()
        try:
            self._reserve(job)
            response = self._call(job)
        except ProviderError as exc:
            self._fail(job, exc, (time.perf_counter() - started) * 1000)
            return
        self._succeed(job, response, (time.perf_counter() - started) * 1000)

    def _claim(self, job_id: str) -> ClaimedJob | None:
        now = utcnow()
        stmt = (
            update(Job)
            .where(
                Job.id == job_id,
                or_(
                    Job.status.in_(CLAIMABLE),
                    # The worker holding it died: its lease ran out.
                    and_(Job.status == "running", Job.lease_expires_at < now),
                ),
            )
            .values(
                status="running",
                attempts=Job.attempts + 1,
                started_at=func.coalesce(Job.started_at, now),
                lease_owner=self._worker,
                lease_expires_at=now + timedelta(seconds=self._deadline_s + LEASE_MARGIN_S),
            )
            .returning(Job.org_id, Job.run_id, Job.capability, Job.request, Job.route,
                       Job.attempts)
        )
        with transaction(self._sessions) as session:
            row = session.execute(stmt).one_or_none()
        if row is None:
            return None
        route = Route(**row.route)
        return ClaimedJob(job_id, row.org_id, row.run_id, row.capability, row.request, route,
                          row.attempts)

    def _reserve(self, job: ClaimedJob) -> None:
        """Hold the hosted spend this call may cost; a refusal fails the job, uncalled."""
        try:
            self._spend.reserve(job)
        except SpendCapExceeded as exc:
            raise PermanentProviderError(exc.message, code="spend_cap_exceeded") from exc

    def _call(self, job: ClaimedJob) -> ProviderResponse:
        provider = self._providers.get(job.route.provider)
        if provider is None:
            raise PermanentProviderError(
                f"provider {job.route.provider!r} of model {job.route.model!r} is not served "
                f"by this worker; supported: {', '.join(sorted(self._providers))}",
                code="provider_unsupported",
            )
        credential = self._credentials.resolve(
            job.org_id, job.route.provider_integration_id, job.route.provider
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
            usage = estimate_usage(model, now, job.request, response.body)
        with transaction(self._sessions) as session:
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
            self._spend.settle(session, job, usage.cost_usd, now)
        log.info("job %s succeeded attempt=%d duration_ms=%.1f tokens_in=%d tokens_out=%d",
                 job.id, job.attempt, elapsed_ms, usage.input_tokens, usage.output_tokens)

    def _fail(self, job: ClaimedJob, exc: ProviderError, elapsed_ms: float) -> None:
        with transaction(self._sessions) as session:
            self._record_attempt(session, job, "failed", exc.status, elapsed_ms, exc.code)
            self._finish(session, job, status="failed", result=None, usage=None,
                         error=exc.to_error())
            self._spend.release(session, job)
        log.warning("job %s failed attempt=%d duration_ms=%.1f code=%s status=%s", job.id,
                    job.attempt, elapsed_ms, exc.code, exc.status)

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
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.attempts == job.attempt, Job.status == "running")
            .values(status=status, result=result, usage=usage, error=error,
                    finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
        )
