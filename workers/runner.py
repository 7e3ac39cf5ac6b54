"""Run one job: claim it, resolve route and credential, call the provider, write back.

The Celery task is a thin shell around :meth:`JobRunner.run`; everything that decides a
job's fate lives here so it reads top to bottom in one place:

    claim (lease)  ->  call the provider  ->  keep the answer  ->  ledger + finish
                              |
                              +-> failure: retrying (due time in SQL) | failed | cancelled

The answer is kept on its attempt row before the ledger write, so a worker that dies between
the two leaves it behind and the next claim finishes the job from it without calling the
provider again. A message for a job that is not claimable is acknowledged and dropped: SQL
decides when a job runs again (:mod:`tasks.scheduler` republishes due retries and jobs whose
lease ran out).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from broker.capabilities import EMBEDDING_CAPABILITIES
from broker.db import as_utc, utcnow
from broker.errors import SpendCapExceeded
from broker.metering import MeteredUsage, estimate_usage, meter
from broker.models import Attempt, Job, UsageEvent
from broker.routing import Deployment, Route
from broker.spend import SpendLedger
from broker.sqlutil import checked_on_row, insert_ignoring_conflicts_many
from tasks.retry_policy import RetryDecision, RetryPolicies, decide
from workers import observe
from workers.credentials import CredentialResolver
from workers.errors import PermanentProviderError, ProviderError, RetryableProviderError
from workers.group_commit import GroupCommitter
from workers.providers.base import CallKind, Provider, ProviderResponse
from workers.redaction import redact

log = logging.getLogger(__name__)

# The hot statements, built once on the tables (not the ORM classes): a job runs each a few
# times, and per-call construction and the ORM's bulk-update bookkeeping cost more CPU than
# the round trip.
_jobs = cast(Table, Job.__table__)
_attempts = cast(Table, Attempt.__table__)
_usage_events = cast(Table, UsageEvent.__table__)
_CLAIM = (
    update(_jobs)
    .where(
        _jobs.c.id.in_(bindparam("b_ids", expanding=True)),
        checked_on_row(or_(
            _jobs.c.status == "queued",
            and_(_jobs.c.status == "retrying",
                 or_(_jobs.c.due_at.is_(None), _jobs.c.due_at <= bindparam("b_now"))),
            # The worker holding it died: its lease ran out.
            and_(_jobs.c.status == "running", _jobs.c.lease_expires_at < bindparam("b_now")),
        )),
    )
    .values(
        status="running",
        attempts=_jobs.c.attempts + 1,
        started_at=func.coalesce(_jobs.c.started_at, bindparam("b_now")),
        lease_owner=bindparam("b_worker"),
        lease_expires_at=bindparam("b_lease"),
        due_at=None,
        published_at=None,
    )
    .returning(_jobs.c.id, _jobs.c.org_id, _jobs.c.run_id, _jobs.c.batch_id,
               _jobs.c.capability, _jobs.c.request,
               _jobs.c.route, _jobs.c.attempts, _jobs.c.attempt_floor,
               _jobs.c.cancel_requested, _jobs.c.created_at)
)
# RETURNING makes SQLAlchemy send many rows as one INSERT with many VALUES, not one each.
_INSERT_ATTEMPT = _attempts.insert().returning(_attempts.c.id)
_MARK_LOST = (
    update(_attempts)
    .where(_attempts.c.job_id == bindparam("b_job_id"),
           _attempts.c.number < bindparam("b_number"), _attempts.c.outcome == "running")
    .values(outcome="lost", finished_at=bindparam("b_now"), error_code="worker_lost")
)
_END_ATTEMPT = (
    update(_attempts)
    .where(_attempts.c.job_id == bindparam("b_job_id"),
           _attempts.c.number == bindparam("b_number"))
    .values(finished_at=bindparam("b_now"), outcome=bindparam("b_outcome"),
            provider_status=bindparam("b_provider_status"),
            latency_ms=bindparam("b_latency_ms"), error_code=bindparam("b_error_code"),
            result=bindparam("b_result", type_=_attempts.c.result.type),
            usage=bindparam("b_usage", type_=_attempts.c.usage.type))
)
# Every lookup here is by a unique key: a join or an IN list let the planner's generic plan
# scan the whole jobs table once enough statements had been prepared.
_DROP_KEPT_ANSWER = (
    update(_attempts)
    .where(_attempts.c.job_id == bindparam("b_job_id"),
           _attempts.c.number == bindparam("b_number"),
           _attempts.c.result.is_not(None),
           select(_jobs.c.id).where(
               _jobs.c.id == bindparam("b_job_id"),
               checked_on_row(_jobs.c.status == "succeeded",
                              _jobs.c.attempts == bindparam("b_number"))).exists())
    .values(result=None)
)
_FINISH_JOB = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("b_id"),
           checked_on_row(_jobs.c.attempts == bindparam("b_claimed"),
                          _jobs.c.status == "running"))
    .values(status=bindparam("b_status"),
            result=bindparam("b_result", type_=_jobs.c.result.type),
            usage=bindparam("b_usage", type_=_jobs.c.usage.type),
            error=bindparam("b_error", type_=_jobs.c.error.type),
            attempts=bindparam("b_attempts"), finished_at=bindparam("b_now"),
            lease_owner=None, lease_expires_at=None)
)


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    org_id: str
    run_id: str | None
    batch_id: str | None
    capability: str
    request: dict[str, Any]
    route: Route
    attempt: int
    attempt_floor: int
    cancel_requested: bool
    created_at: datetime | None = None


@dataclass(frozen=True)
class _Claim:
    job: ClaimedJob
    stored: StoredAnswer | None  # an answer kept by an earlier attempt: finish from it
    held: bool  # the claim also holds this attempt's spend (or it needs none)


@dataclass(frozen=True)
class StoredAnswer:
    """An attempt whose provider call returned but whose job was never finished."""

    attempt: int
    result: dict[str, Any]
    usage: MeteredUsage


class JobRunner:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        deployment: Deployment,
        providers: dict[str, Provider],
        credentials: CredentialResolver,
        worker_name: str,
        policies: RetryPolicies,
        lease_margin_s: float,
        commit_writers: int = 1,
        rng: random.Random | None = None,
        on_finished: Callable[[str], None] | None = None,
        call_slots: int | None = None,
    ):
        self._sessions = sessions
        # Every write goes through the group committer: under load, concurrent jobs share
        # transactions instead of each paying for its own checkout, BEGIN and COMMIT.
        self._commits = GroupCommitter(sessions, writers=commit_writers)
        self._spend = SpendLedger(sessions, deployment.catalog)
        self._deployment = deployment
        self._providers = providers
        self._credentials = credentials
        self._worker = worker_name
        self._policies = policies
        # A lease outlives the longest attempt deadline by the margin before the scheduler
        # hands the job to another worker.
        self._lease_s = policies.max_attempt_deadline_s + lease_margin_s
        self._rng = rng or random.Random()
        # Told each job id whose state changed, so synchronous callers wake up and re-read.
        self._on_finished = on_finished or (lambda job_id: None)
        # Provider calls in flight at once, when the process runs more threads than that:
        # the spare threads do the jobs' claims and ledger writes while the calls go on.
        self._call_slots = threading.BoundedSemaphore(call_slots) if call_slots else None
        self._slot_wait = threading.local()  # this thread's wait for a slot, in seconds

    def close(self) -> None:
        self._commits.close()

    def run(self, job_id: str) -> None:
        claimed = self._claim(job_id)
        if claimed is None:
            self._log_dropped(job_id)
            return
        try:
            self._process(claimed)
        finally:
            # Only a job on its own can have a caller waiting on it in line (the OpenAI
            # path); batch items are polled through their batch.
            if claimed.job.batch_id is None:
                self._on_finished(job_id)

    def _process(self, claimed: _Claim) -> None:
        job, stored = claimed.job, claimed.stored
        if stored is not None:
            log.info("job %s finishing from the stored answer of attempt=%d (no provider call)",
                     job.id, stored.attempt)
            self._complete(job, stored, elapsed_ms=0.0)
            return
        refusal = self._refusal(job)
        if refusal is not None:
            self._fail(job, refusal, 0.0)
            return
        self._attempt(job, held=claimed.held)

    def _refusal(self, job: ClaimedJob) -> ProviderError | None:
        """Why a claimed job must end without a provider call, if it must."""
        if job.cancel_requested:
            return PermanentProviderError(
                "cancelled while the attempt running it was lost; not run again",
                code="job_cancelled")
        if job.attempt - job.attempt_floor > self._policies.for_capability(
                job.capability).max_attempts:
            return RetryableProviderError(
                f"the workers running earlier attempts of this job stopped (killed or lost) "
                f"{job.attempt - 1 - job.attempt_floor} time(s); not trying again",
                code="worker_lost")
        return None

    def _attempt(self, job: ClaimedJob, *, held: bool) -> None:
        """Call the provider once; keep the answer, then bill and finish, or record the failure."""
        deadline_s = self._policies.for_capability(job.capability).attempt_deadline_s
        log.info("job %s running attempt=%d org=%s capability=%s route=%s/%s", job.id,
                 job.attempt, job.org_id, job.capability, job.route.provider_integration_id,
                 job.route.model, extra=observe.log_fields(job, "running"))
        started = time.perf_counter()
        self._slot_wait.s = 0.0
        with observe.running(job):
            try:
                if not held:
                    self._reserve(job)
                response = self._call(job, deadline_s)
            except ProviderError as exc:
                self._fail(job, exc, self._ms_since(started))
                return
        # The attempt's latency leaves out the wait for a call slot: it is the provider's.
        elapsed_ms = self._ms_since(started)
        answer = StoredAnswer(job.attempt, response.body, self._meter(job, response))
        # The answer goes to the attempt row in a transaction of its own, committed before
        # the ledger write: from there on, it is never asked of the provider again.
        kept = {"b_job_id": job.id, "b_number": job.attempt, "b_now": utcnow(),
                "b_outcome": "succeeded", "b_provider_status": response.status,
                "b_latency_ms": round(elapsed_ms, 3), "b_error_code": None,
                "b_result": answer.result, "b_usage": answer.usage.to_dict()}
        self._complete(job, answer, elapsed_ms, kept=kept)

    # -- claim --------------------------------------------------------------------------

    def _claim(self, job_id: str) -> _Claim | None:
        """Lease the job and number a new attempt; for a fresh attempt that will run, hold
        its spend in the same transaction. Batched with the other claims waiting."""
        return self._commits.run_step(self._claim_step, job_id)

    def _claim_step(self, session: Session, job_ids: list[str]) -> list[_Claim | None]:
        now = utcnow()
        conn = session.connection()
        rows = {row.id: row for row in conn.execute(_CLAIM, {
            "b_ids": job_ids, "b_now": now, "b_worker": self._worker,
            "b_lease": now + timedelta(seconds=self._lease_s)})}
        claims: list[_Claim | None] = []
        fresh: list[ClaimedJob] = []
        for job_id in job_ids:
            # pop: a job whose message came twice is claimed by the first of them only.
            row = rows.pop(job_id, None)
            if row is None:
                claims.append(None)
                continue
            job = ClaimedJob(job_id, row.org_id, row.run_id, row.batch_id, row.capability,
                             row.request, Route(**row.route), row.attempts, row.attempt_floor,
                             bool(row.cancel_requested), as_utc(row.created_at))
            stored = None
            if job.attempt > 1:  # only a job that ran before can have lost or kept answers
                self._mark_lost(session, job)
                stored = self._stored_answer(session, job_id)
            if stored is not None:
                claims.append(_Claim(job, stored, held=False))
                continue
            claims.append(_Claim(job, None, held=False))
            fresh.append(job)
        if fresh:
            conn.execute(_INSERT_ATTEMPT, [
                {"job_id": job.id, "number": job.attempt, "worker": self._worker,
                 "started_at": now, "outcome": "running"} for job in fresh])
            runnable = [job for job in fresh if self._refusal(job) is None]
            held = dict(zip([job.id for job in runnable],
                            self._spend.hold_many(session, runnable, now), strict=True))
            claims = [claim if claim is None or claim.stored is not None
                      else dataclasses.replace(claim, held=held.get(claim.job.id, False))
                      for claim in claims]
        return claims

    def _mark_lost(self, session: Session, job: ClaimedJob) -> None:
        """Earlier attempts still marked running had their worker die under them."""
        session.connection().execute(_MARK_LOST, {"b_job_id": job.id, "b_number": job.attempt,
                                                  "b_now": utcnow()})

    def _stored_answer(self, session: Session, job_id: str) -> StoredAnswer | None:
        row = session.execute(
            select(Attempt.number, Attempt.result, Attempt.usage)
            .where(Attempt.job_id == job_id, Attempt.outcome == "succeeded",
                   Attempt.result.is_not(None))
            .order_by(Attempt.number.desc()).limit(1)
        ).one_or_none()
        if row is None or row.usage is None:
            return None
        usage = MeteredUsage(
            input_tokens=int(row.usage["input_tokens"]),
            cached_input_tokens=int(row.usage["cached_input_tokens"]),
            output_tokens=int(row.usage["output_tokens"]),
            cost_usd=Decimal(str(row.usage["cost_usd"])),
            estimated=bool(row.usage["estimated"]),
        )
        return StoredAnswer(row.number, row.result, usage)

    def _log_dropped(self, job_id: str) -> None:
        with self._sessions() as session:
            row = session.execute(
                select(Job.status, Job.attempts).where(Job.id == job_id)
            ).one_or_none()
        fields = {"job_id": job_id, "job_status": "dropped"}
        if row is None:
            log.warning("job %s message dropped: no such job", job_id, extra=fields)
        else:
            # Running elsewhere, not yet due or finished: SQL says when it runs next.
            log.info("job %s message dropped: status=%s attempt=%d", job_id, row.status,
                     row.attempts, extra=fields)

    # -- the call -----------------------------------------------------------------------

    def _reserve(self, job: ClaimedJob) -> None:
        """When the claim could not hold the spend this call may cost: free orphaned holds
        and try again; a refusal fails the job, uncalled."""
        try:
            self._spend.reserve(job)
        except SpendCapExceeded as exc:
            raise PermanentProviderError(exc.message, code="spend_cap_exceeded") from exc

    def _call(self, job: ClaimedJob, deadline_s: float) -> ProviderResponse:
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
        waited_s = self._take_call_slot(deadline_s)
        try:
            # The wait for the slot counts against the attempt's deadline, so claim to end
            # of call stays within the deadline and the job's lease.
            return provider.call(kind, job.request, model=job.route.model,
                                 credential=credential, deadline_s=deadline_s - waited_s)
        except ProviderError as exc:
            exc.message = redact(exc.message, [credential.api_key,
                                               *self._credentials.live_secrets()])
            raise
        finally:
            if self._call_slots is not None:
                self._call_slots.release()

    def _take_call_slot(self, deadline_s: float) -> float:
        """Wait for one of the process's provider call slots; returns the seconds waited."""
        if self._call_slots is None:
            return 0.0
        started = time.perf_counter()
        if not self._call_slots.acquire(timeout=deadline_s):
            self._slot_wait.s = time.perf_counter() - started  # the provider was not called
            raise RetryableProviderError(
                f"no provider call slot came free within the attempt deadline "
                f"({deadline_s:g} s): every call this worker runs at once (--concurrency) "
                f"was busy", code="call_slot_timeout")
        waited_s = time.perf_counter() - started
        self._slot_wait.s = waited_s
        return waited_s

    def _ms_since(self, started: float) -> float:
        return (time.perf_counter() - started - getattr(self._slot_wait, "s", 0.0)) * 1000

    # -- success ------------------------------------------------------------------------

    def _keep_step(self, session: Session, attempts: list[dict[str, Any]]) -> list[None]:
        session.connection().execute(_END_ATTEMPT, attempts)
        return [None] * len(attempts)

    def _meter(self, job: ClaimedJob, response: ProviderResponse) -> MeteredUsage:
        model = self._deployment.catalog.get(job.route.model)
        now = utcnow()
        if response.usage is not None:
            return meter(model, now, input_tokens=response.usage.input_tokens,
                         cached_input_tokens=response.usage.cached_input_tokens,
                         output_tokens=response.usage.output_tokens)
        # Until every provider reports usage, an estimate (flagged) beats a zero bill.
        return estimate_usage(model, now, job.request, response.body)

    def _complete(self, job: ClaimedJob, answer: StoredAnswer, elapsed_ms: float, *,
                  kept: dict[str, Any] | None = None) -> None:
        """One transaction: the ledger event of the answering attempt and the finished job;
        with ``kept``, after the one that keeps the answer on its attempt row."""
        if kept is None:
            self._commits.run_step(self._complete_step, (job, answer))
        else:
            self._commits.run_steps((self._keep_step, kept), (self._complete_step, (job, answer)))
        usage = answer.usage
        log.info("job %s succeeded attempt=%d duration_ms=%.1f tokens_in=%d tokens_out=%d",
                 job.id, answer.attempt, elapsed_ms, usage.input_tokens, usage.output_tokens,
                 extra=observe.log_fields(job, "succeeded", elapsed_ms))
        observe.attempt_succeeded(job, elapsed_ms, input_tokens=usage.input_tokens,
                                  cached_input_tokens=usage.cached_input_tokens,
                                  output_tokens=usage.output_tokens, cost_usd=usage.cost_usd)

    def _complete_step(self, session: Session,
                       done: list[tuple[ClaimedJob, StoredAnswer]]) -> list[None]:
        now = utcnow()
        conn = session.connection()
        # Keyed by (job, attempt): writing the same attempt twice leaves one event.
        insert_ignoring_conflicts_many(session, _usage_events, [
            _usage_row(job, answer, now) for job, answer in done], ("job_id", "attempt"))
        conn.execute(_FINISH_JOB, [{
            "b_id": job.id, "b_claimed": job.attempt, "b_status": "succeeded",
            "b_result": answer.result, "b_usage": answer.usage.to_dict(), "b_error": None,
            "b_attempts": answer.attempt, "b_now": now} for job, answer in done])
        # The answering attempt's hold becomes its actual cost, with its ledger event.
        self._spend.settle_many(session, [
            (dataclasses.replace(job, attempt=answer.attempt), answer.usage.cost_usd)
            for job, answer in done], now)
        # A kept answer is released once its job is finished with it.
        conn.execute(_DROP_KEPT_ANSWER, [{"b_job_id": job.id, "b_number": answer.attempt}
                                         for job, answer in done])
        return [None] * len(done)

    # -- failure ------------------------------------------------------------------------

    def _fail(self, job: ClaimedJob, exc: ProviderError, elapsed_ms: float) -> None:
        policy = self._policies.for_capability(job.capability)
        decision = decide(policy, exc, job.attempt - job.attempt_floor, self._rng)
        def write(session: Session) -> str | None:
            self._end_attempt(session, job.id, job.attempt, "failed", exc.status, elapsed_ms,
                              exc.code)
            status = self._after_failure(session, job, decision)
            self._spend.release(session, job)
            return status

        status = self._commits.run(write)
        observe.attempt_failed(job, elapsed_ms, exc.code)
        fields = observe.log_fields(job, status or "failed", elapsed_ms,
                                    code=decision.error["code"], provider_status=exc.status)
        if status == "retrying":
            log.warning("job %s retrying attempt=%d duration_ms=%.1f code=%s status=%s "
                        "delay_s=%.2f", job.id, job.attempt, elapsed_ms, exc.code, exc.status,
                        decision.delay_s, extra=fields)
            return
        log.warning("job %s %s attempt=%d duration_ms=%.1f code=%s status=%s", job.id,
                    status or "unchanged (lease lost)", job.attempt, elapsed_ms,
                    decision.error["code"], exc.status, extra=fields)
        if status in ("failed", "cancelled"):
            observe.job_finished(job, status)

    def _after_failure(self, session: Session, job: ClaimedJob,
                       decision: RetryDecision) -> str | None:
        """Retry later, give up, or end cancelled when a cancel came in during the call."""
        now = utcnow()
        if decision.retry:
            due = now + timedelta(seconds=decision.delay_s)
            values: dict[str, Any] = {
                "status": case((_jobs.c.cancel_requested, "cancelled"), else_="retrying"),
                "due_at": case((_jobs.c.cancel_requested, None), else_=due),
                "finished_at": case((_jobs.c.cancel_requested, now), else_=None),
            }
        else:
            values = {
                "status": case((_jobs.c.cancel_requested, "cancelled"), else_="failed"),
                "due_at": None, "finished_at": now,
            }
        row = session.execute(
            update(_jobs)
            .where(_jobs.c.id == job.id,
                   checked_on_row(_jobs.c.attempts == job.attempt, _jobs.c.status == "running"))
            .values(error=decision.error, published_at=None, lease_owner=None,
                    lease_expires_at=None, **values)
            .returning(_jobs.c.status)
        ).one_or_none()
        return None if row is None else str(row.status)

    # -- rows ---------------------------------------------------------------------------

    def _end_attempt(self, session: Session, job_id: str, number: int, outcome: str,
                     provider_status: int | None, elapsed_ms: float, error_code: str | None,
                     *, result: dict[str, Any] | None = None,
                     usage: dict[str, Any] | None = None) -> None:
        session.connection().execute(_END_ATTEMPT, {
            "b_job_id": job_id, "b_number": number, "b_now": utcnow(), "b_outcome": outcome,
            "b_provider_status": provider_status, "b_latency_ms": round(elapsed_ms, 3),
            "b_error_code": error_code, "b_result": result, "b_usage": usage,
        })

    def _finish(self, session: Session, job: ClaimedJob, *, status: str,
                result: dict[str, Any] | None, usage: dict[str, Any] | None,
                error: dict[str, Any] | None, attempts: int) -> bool:
        """Finish the job if this claim still holds it; True when it did."""
        done = session.connection().execute(_FINISH_JOB, {
            "b_id": job.id, "b_claimed": job.attempt, "b_status": status, "b_result": result,
            "b_usage": usage, "b_error": error, "b_attempts": attempts, "b_now": utcnow(),
        })
        return bool(getattr(done, "rowcount", 0))


def _usage_row(job: ClaimedJob, answer: StoredAnswer, now: datetime) -> dict[str, Any]:
    usage = answer.usage
    return {
        "org_id": job.org_id, "run_id": job.run_id, "job_id": job.id,
        "attempt": answer.attempt, "capability": job.capability,
        "integration_id": job.route.provider_integration_id,
        "billing_kind": job.route.billing_kind, "provider": job.route.provider,
        "model": job.route.model, "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens, "cost_usd": usage.cost_usd,
        "meters": usage.meters, "estimated": usage.estimated, "created_at": now,
    }
