"""Batches: submit thousands of items at once, poll counts, stream results as JSON Lines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from broker.api.auth import CurrentPrincipal, State
from broker.api.guards import NoRawCredentials
from broker.api.responses import JSON
from broker.api.submission import submit
from broker.schemas import BatchSubmission

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.post("", status_code=202)
async def submit_batch(
    _: NoRawCredentials,
    body: BatchSubmission,
    principal: CurrentPrincipal,
    state: State,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    org = principal.org_id
    return await submit(
        state, org, idempotency_key, "batch", body,
        create=lambda record: state.jobs.submit_batch(org, body, record=record),
        read=lambda resource_id: state.jobs.get_batch(org, resource_id),
    )


@router.get("/{batch_id}")
def get_batch(batch_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.jobs.get_batch(principal.org_id, batch_id))


@router.get("/{batch_id}/results")
def batch_results(batch_id: str, principal: CurrentPrincipal, state: State) -> Any:
    lines = state.jobs.iter_batch_results(principal.org_id, batch_id)
    return StreamingResponse(_jsonl(lines), media_type="application/jsonl")


@router.post("/{batch_id}/retry")
def retry_batch(batch_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.control.retry_batch(principal.org_id, batch_id))


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, principal: CurrentPrincipal, state: State) -> Any:
    return JSON(state.control.cancel_batch(principal.org_id, batch_id))


def _jsonl(lines: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    for line in lines:
        yield orjson.dumps(line) + b"\n"
