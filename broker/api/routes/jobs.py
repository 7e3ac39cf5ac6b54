"""Single jobs: submit and poll."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from broker.api.auth import CurrentPrincipal, State
from broker.api.guards import NoRawCredentials
from broker.api.responses import JSON
from broker.schemas import JobSubmission

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202)
async def submit_job(
    _: NoRawCredentials,
    body: JobSubmission,
    principal: CurrentPrincipal,
    state: State,
) -> Any:
    view = await run_in_threadpool(state.jobs.submit_job, principal.org_id, body)
    return JSON(view, status_code=202)


@router.get("/{job_id}")
def get_job(job_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.jobs.get_job(principal.org_id, job_id))
