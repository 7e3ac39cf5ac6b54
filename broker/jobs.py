"""Submitting jobs and batches, and reading them back.

Submission writes every row first (SQL is the truth), then publishes the ids. A rejected
submission writes nothing; a publish failure removes what it wrote and answers 503.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

from celery import Celery
from kombu.exceptions import BatchPublishError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from broker.db import transaction, utcnow
from broker.errors import InvalidRequest, NotFound, ServiceUnavailable
from broker.idempotency import Recorder
from broker.models import Batch, IdempotencyKey, Job
from broker.orgs import OrgService
from broker.routing import Deployment, Route, resolve_routes, validate_routing
from broker.schemas import BatchSubmission, JobSubmission
from broker.spend import SpendLedger
from broker.validation import check_capability, check_request, check_storable, check_text
from broker.views import batch_view, bucket_counts, job_view, result_line
from tasks.publish import publish_jobs

log = logging.getLogger(__name__)
RESULTS_PAGE = 1000
#: Width of the id columns; longer ids cannot exist.
ID_MAX_CHARS = 40
# A broker that drops while a publish batch is flushed raises BatchPublishError (delivery
# uncertain); the rows are removed either way, so a message that did get out finds no job.
PUBLISH_ERRORS = (
    KombuOperationalError, BatchPublishError, RedisError, ConnectionError, OSError,
)
# A batch with nothing queued or running any more ends in the status its current one leads to.
SETTLES_AS = {"in_progress": "completed", "cancelling": "cancelled"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class JobService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        deployment: Deployment,
        celery_app: Celery,
        orgs: OrgService,
        *,
        max_batch_items: int,
        spend: SpendLedger | None = None,
    ):
        self._sessions = sessions
        self._deployment = deployment
        self._celery = celery_app
        self._orgs = orgs
        self._max_batch_items = max_batch_items
        self._spend = spend or SpendLedger(sessions, deployment.catalog)

    # -- submission ---------------------------------------------------------------------

    def submit_job(
        self, org_id: str, body: JobSubmission, *, record: Recorder | None = None,
        vet: Callable[[Route], None] | None = None,
    ) -> dict[str, Any]:
        """``vet`` sees the resolved route before anything is written, and may refuse it."""
        check_capability(body.capability, param="capability")
        check_request(body.capability, body.request, param="request")
        _check_run_fields(body)
        routing = validate_routing(
            body.model_routing, self._deployment.catalog, param="model_routing"
        )
        job = Job(
            id=new_id("job"), org_id=org_id, capability=body.capability, status="queued",
            request=body.request, meta=body.metadata, run_id=body.run_id, attempts=0,
            created_at=utcnow(), cancel_requested=False, attempt_floor=0,
        )
        # One transaction reads the org's routing and cap and writes the row: a refusal
        # rolls back with nothing written.
        with transaction(self._sessions) as session:
            route = self._routes(session, org_id, {body.capability}, routing)[body.capability]
            if vet is not None:
                vet(route)
            self._spend.check_admission(org_id, [route], session)
            job.route = route.to_dict()
            if record is not None:
                record(session, job.id)
            session.connection().execute(_INSERT_JOB, {
                "id": job.id, "org_id": org_id, "capability": job.capability, "status": "queued",
                "request": job.request, "route": job.route, "metadata": job.meta,
                "run_id": job.run_id, "attempts": 0, "created_at": job.created_at,
                "cancel_requested": False, "attempt_floor": 0,
            })
        self._publish_or_undo([(job.id, job.capability)], job_ids=[job.id], batch_id=None)
        shown = f"{job.route['provider_integration_id']}/{job.route['model']}"
        log.info("job %s queued org=%s capability=%s route=%s", job.id, org_id, job.capability,
                 shown, extra={"job_id": job.id, "org_id": org_id, "capability": job.capability,
                               "attempt": 0, "route": shown, "job_status": "queued"})
        return job_view(job)

    def submit_batch(
        self, org_id: str, body: BatchSubmission, *, record: Recorder | None = None
    ) -> dict[str, Any]:
        items = body.items
        if len(items) > self._max_batch_items:
            raise InvalidRequest(
                f"items holds {len(items)} entries; a batch takes at most "
                f"{self._max_batch_items}: split it into several batches",
                param="items",
            )
        seen: set[str] = set()
        for index, item in enumerate(items):
            if item.custom_id in seen:
                raise InvalidRequest(
                    f"items[{index}].custom_id {item.custom_id!r} is used twice; custom_id "
                    "must be unique within a batch",
                    param=f"items[{index}].custom_id",
                )
            seen.add(item.custom_id)
            check_capability(item.capability, param=f"items[{index}].capability")
            check_request(item.capability, item.request, param=f"items[{index}].request")
        _check_run_fields(body)
        routing = validate_routing(
            body.model_routing, self._deployment.catalog, param="model_routing"
        )
        with self._sessions() as session:
            routes = self._routes(session, org_id, {item.capability for item in items}, routing)
            self._spend.check_admission(org_id, routes.values(), session)
        now = utcnow()
        batch = Batch(
            id=new_id("batch"), org_id=org_id, run_id=body.run_id, status="in_progress",
            total=len(items), model_routing=routing or None, meta=body.metadata, created_at=now,
        )
        route_dicts = {cap: route.to_dict() for cap, route in routes.items()}
        rows = [
            {
                "id": new_id("job"), "org_id": org_id, "batch_id": batch.id,
                "custom_id": item.custom_id, "batch_index": index, "run_id": body.run_id,
                "capability": item.capability, "status": "queued", "request": item.request,
                "route": route_dicts[item.capability], "metadata": None, "attempts": 0,
                "created_at": now,
            }
            for index, item in enumerate(items)
        ]
        with transaction(self._sessions) as session:
            if record is not None:
                record(session, batch.id)
            session.add(batch)
            session.flush()
            session.connection().execute(_INSERT_JOBS, rows)
        published = [(str(row["id"]), str(row["capability"])) for row in rows]
        self._publish_or_undo(published, job_ids=None, batch_id=batch.id)
        log.info("batch %s queued org=%s items=%d", batch.id, org_id, len(items),
                 extra={"batch_id": batch.id, "org_id": org_id, "items": len(items),
                        "job_status": "queued"})
        return batch_view(batch, bucket_counts([("queued", len(items))]))

    def _routes(
        self, session: Session, org_id: str, capabilities: set[str],
        routing: dict[str, dict[str, str]],
    ) -> dict[str, Route]:
        org_routing = self._orgs.stored_routing(session, org_id)
        return resolve_routes(
            sorted(capabilities), catalog=self._deployment.catalog,
            defaults=self._deployment.defaults, org_routing=org_routing,
            submission_routing=routing,
        )

    def _publish_or_undo(
        self, jobs: list[tuple[str, str]], *, job_ids: list[str] | None, batch_id: str | None
    ) -> None:
        try:
            publish_jobs(self._celery, jobs)
        except PUBLISH_ERRORS as exc:
            log.error("publish failed, removing %d unpublished job(s): %s", len(jobs),
                      type(exc).__name__)
            with transaction(self._sessions) as session:
                ids = [batch_id] if batch_id is not None else job_ids or []
                session.execute(delete(IdempotencyKey).where(IdempotencyKey.resource_id.in_(ids)))
                if batch_id is not None:
                    session.execute(delete(Job).where(Job.batch_id == batch_id))
                    session.execute(delete(Batch).where(Batch.id == batch_id))
                elif job_ids:
                    session.execute(delete(Job).where(Job.id.in_(job_ids)))
            raise ServiceUnavailable(
                "the message broker is unreachable; nothing was queued. Retry the submission."
            ) from exc

    # -- reading ------------------------------------------------------------------------

    def get_job(self, org_id: str, job_id: str) -> dict[str, Any]:
        with self._sessions() as session:
            job = session.get(Job, job_id) if _could_exist(job_id) else None
        if job is None or job.org_id != org_id:
            raise NotFound(f"no job {job_id!r} in this org", param="job_id")
        return job_view(job)

    def get_batch(self, org_id: str, batch_id: str) -> dict[str, Any]:
        with self._sessions() as session:
            batch = self._own_batch(session, org_id, batch_id)
            rows = session.execute(
                select(Job.status, func.count()).where(Job.batch_id == batch_id)
                .group_by(Job.status)
            ).all()
        counts = bucket_counts([(status, n) for status, n in rows])
        if counts["queued"] + counts["running"] == 0 and batch.status in SETTLES_AS:
            batch = self._mark_settled(batch)
        return batch_view(batch, counts)

    def _mark_settled(self, batch: Batch) -> Batch:
        with transaction(self._sessions) as session:
            session.execute(
                update(Batch).where(Batch.id == batch.id, Batch.status == batch.status)
                .values(status=SETTLES_AS[batch.status], completed_at=utcnow())
            )
            refreshed = session.get(Batch, batch.id)
        assert refreshed is not None
        return refreshed

    def iter_batch_results(self, org_id: str, batch_id: str) -> Iterator[dict[str, Any]]:
        """Result lines in submission order, read in pages so memory stays flat."""
        with self._sessions() as session:
            self._own_batch(session, org_id, batch_id)
        return self._result_pages(batch_id)

    def _result_pages(self, batch_id: str) -> Iterator[dict[str, Any]]:
        last = -1
        while True:
            with self._sessions() as session:
                page = session.scalars(
                    select(Job).where(Job.batch_id == batch_id, Job.batch_index > last)
                    .order_by(Job.batch_index).limit(RESULTS_PAGE)
                ).all()
            if not page:
                return
            for job in page:
                yield result_line(job)
            last = page[-1].batch_index or 0

    def _own_batch(self, session: Session, org_id: str, batch_id: str) -> Batch:
        batch = session.get(Batch, batch_id) if _could_exist(batch_id) else None
        if batch is None or batch.org_id != org_id:
            raise NotFound(f"no batch {batch_id!r} in this org", param="batch_id")
        return batch


# Core inserts: the ORM's unit of work costs more CPU than the round trip it makes. With
# RETURNING, SQLAlchemy sends a batch's rows as INSERTs of many VALUES, not one row each.
_INSERT_JOB = cast(Table, Job.__table__).insert()
_INSERT_JOBS = _INSERT_JOB.returning(cast(Table, Job.__table__).c.id)


def _check_run_fields(body: JobSubmission | BatchSubmission) -> None:
    check_text(body.run_id, param="run_id")
    check_storable(body.metadata, param="metadata")


def _could_exist(row_id: str) -> bool:
    # PostgreSQL refuses a NUL byte even in a lookup; no id we hand out has one.
    return "\x00" not in row_id and len(row_id) <= ID_MAX_CHARS
