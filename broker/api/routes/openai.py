"""OpenAI-compatible endpoints: each call becomes a job on its capability's queue.

``POST /v1/chat/completions`` and ``POST /v1/embeddings`` submit a job like ``POST /v1/jobs``,
wait for it (notified, see :mod:`broker.completion_wait`) and answer with its result in OpenAI's
shape, streamed as Server-Sent Events when ``stream`` is set. The capability comes from the
``X-Molar-Capability`` header or from ``model`` naming a capability key; run-level routing from
the ``X-Molar-Model-Routing`` header. Every answer carries the job id in ``X-Molar-Job-Id``.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from broker.api import openai_wire as wire
from broker.api.auth import CurrentPrincipal, State
from broker.api.responses import JSON
from broker.completion_wait import CompletionWaiter, WaitTimedOut
from broker.errors import InvalidRequest
from broker.schemas import JobSubmission

router = APIRouter(tags=["openai"])
OptionalHeader = Annotated[str | None, Header()]


@router.get("/v1/models")
def list_models(_: CurrentPrincipal, state: State) -> Any:
    return JSON(wire.model_list(state.deployment.catalog))


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, principal: CurrentPrincipal, state: State,
    x_molar_capability: OptionalHeader = None, x_molar_model_routing: OptionalHeader = None,
    x_molar_run_id: OptionalHeader = None, x_molar_timeout_s: OptionalHeader = None,
) -> Response:
    body = await _json_body(request)
    capability = wire.pick_capability(x_molar_capability, body.get("model"), embeddings=False)
    submission = wire.submission(capability, body, x_molar_model_routing, x_molar_run_id)
    return await _run(request, state, principal.org_id, submission,
                      stream=body.get("stream") is True, timeout_header=x_molar_timeout_s)


@router.post("/v1/embeddings")
async def embeddings(
    request: Request, principal: CurrentPrincipal, state: State,
    x_molar_capability: OptionalHeader = None, x_molar_model_routing: OptionalHeader = None,
    x_molar_run_id: OptionalHeader = None, x_molar_timeout_s: OptionalHeader = None,
) -> Response:
    body = await _json_body(request)
    capability = wire.pick_capability(x_molar_capability, body.get("model"), embeddings=True)
    submission = wire.submission(capability, body, x_molar_model_routing, x_molar_run_id)
    return await _run(request, state, principal.org_id, submission, stream=False,
                      timeout_header=x_molar_timeout_s)


def _submit(state: State, org_id: str, submission: JobSubmission) -> dict[str, Any]:
    """Checks, route, admission and the job row, on one trip to the thread pool."""
    wire.check_submission(state, submission)
    vet = functools.partial(wire.check_route, state.deployment.catalog, submission.request)
    return state.jobs.submit_job(org_id, submission, vet=vet)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", param="body",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param="body",
                             code="invalid_json")
    return body


async def _run(request: Request, state: State, org_id: str, submission: JobSubmission, *,
               stream: bool, timeout_header: str | None) -> Response:
    timeout_s = wire.wait_timeout_s(timeout_header, state.settings.task_time_limit_s)
    view = await run_in_threadpool(_submit, state, org_id, submission)
    headers = {"X-Molar-Job-Id": view["id"], "X-Molar-Capability": submission.capability,
               "X-Molar-Model": view["route"]["model"]}
    waiter: CompletionWaiter = request.app.state.completions
    try:
        job = await waiter.wait(view["id"], timeout_s)
    except WaitTimedOut:
        return wire.still_running(view["id"], timeout_s, headers)
    if job.status != "succeeded" or job.result is None:
        return wire.job_error(job, headers)
    if stream:
        include_usage = bool((submission.request.get("stream_options") or {})
                             .get("include_usage"))
        return StreamingResponse(wire.sse_events(job.result, include_usage),
                                 media_type="text/event-stream", headers=headers)
    return JSON(job.result, headers=headers)

