"""Single jobs: submit and poll."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header

from broker.api.auth import CurrentPrincipal, State
from broker.api.guards import NoRawCredentials
from broker.api.responses import JSON
from broker.api.submission import submit
from broker.schemas import JobSubmission

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202)
async def submit_job(
    _: NoRawCredentials,
    body: JobSubmission,
    principal: CurrentPrincipal,
    state: State,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    org = principal.org_id
    return await submit(
        state, org, idempotency_key, "job", body,
        create=lambda record: state.jobs.submit_job(org, body, record=record),
        read=lambda resource_id: state.jobs.get_job(org, resource_id),
    )


@router.get("/{job_id}")
def get_job(job_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.jobs.get_job(principal.org_id, job_id))


@router.get("/{job_id}/attempts")
def job_attempts(job_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.control.attempts(principal.org_id, job_id))


@router.post("/{job_id}/retry")
def retry_job(job_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.control.retry_job(principal.org_id, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.control.cancel_job(principal.org_id, job_id))
