"""Submitting a job or a batch, with or without an ``Idempotency-Key``: one path for both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from broker.api.auth import State
from broker.api.responses import JSON
from broker.idempotency import Recorder, make_claim

View = dict[str, Any]


async def submit(
    state: State, org_id: str, idempotency_key: str | None, kind: str, body: BaseModel,
    create: Callable[[Recorder | None], View], read: Callable[[str], View],
) -> JSON:
    """202 with what ``create`` made; with a key seen before, 200 with what ``read`` finds."""
    if idempotency_key is None:
        return JSON(await run_in_threadpool(create, None), status_code=202)
    claim = make_claim(org_id, idempotency_key, kind, body)
    view, status = await run_in_threadpool(state.submissions.submit, claim, create, read)
    return JSON(view, status_code=status)
