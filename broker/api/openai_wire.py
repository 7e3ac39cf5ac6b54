"""The OpenAI side of the compatible endpoints: picking the capability, refusing early, and
turning a finished job into an OpenAI answer (JSON, Server-Sent Events or an error).

Kept out of the router so the route functions stay a few lines each.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson

from broker.api.errors import error_response
from broker.api.responses import JSON
from broker.api.state import AppState
from broker.capabilities import CAPABILITIES, EMBEDDING_CAPABILITIES, unknown_capability_message
from broker.catalog import Catalog
from broker.completion_wait import JobOutcome
from broker.errors import InvalidRequest
from broker.metering import estimate_input_tokens
from broker.routing import Route, validate_routing
from broker.schemas import JobSubmission
from broker.validation import check_request
from workers.providers.anthropic_translate import unsupported_reason

CATALOG_CREATED = 1_700_000_000
ROUTING_HEADER = "X-Molar-Model-Routing"
# Statuses of a failed job's error, by our error code first, then by the provider's status.
STATUS_BY_CODE = {
    "context_length_exceeded": 400, "unsupported_parameter": 400, "spend_cap_exceeded": 402,
    "integration_not_found": 400, "provider_timeout": 504, "provider_unreachable": 502,
}
# The provider refused the broker's own credential: not the caller's fault, so not 401/403.
PASSED_THROUGH = {400: 400, 404: 404, 409: 409, 413: 400, 422: 422, 429: 429}
ERROR_TYPES = {
    400: "invalid_request_error", 402: "insufficient_quota", 404: "not_found_error",
    409: "conflict_error", 422: "invalid_request_error", 429: "rate_limit_error",
}


# --- before the job ----------------------------------------------------------------------------


def model_list(catalog: Catalog) -> dict[str, Any]:
    """Catalog models first, then the capability keys a caller may pass as ``model``."""
    models = [
        {"id": name, "object": "model", "created": CATALOG_CREATED, "owned_by": info.provider,
         "kind": info.kind, "context_window": info.context_window}
        for name, info in sorted(catalog.models.items())
    ]
    capabilities = [
        {"id": cap, "object": "model", "created": CATALOG_CREATED, "owned_by": "molar-capability",
         "kind": "embedding" if cap in EMBEDDING_CAPABILITIES else "chat"}
        for cap in CAPABILITIES
    ]
    return {"object": "list", "data": models + capabilities}


def pick_capability(header: str | None, model: object, *, embeddings: bool) -> str:
    if header:
        capability = header.strip()
        if capability not in CAPABILITIES:
            raise InvalidRequest(unknown_capability_message(capability),
                                 param="X-Molar-Capability")
    elif isinstance(model, str) and model in CAPABILITIES:
        capability = model
    else:
        raise InvalidRequest(
            "no capability named: send the X-Molar-Capability header or set model to a "
            f"capability key (one of: {', '.join(CAPABILITIES)}); got model={model!r}",
            param="model", code="capability_required")
    if (capability in EMBEDDING_CAPABILITIES) != embeddings:
        endpoint = "/v1/embeddings" if capability in EMBEDDING_CAPABILITIES else \
            "/v1/chat/completions"
        raise InvalidRequest(f"capability {capability!r} is served by POST {endpoint}",
                             param="X-Molar-Capability" if header else "model")
    return capability


def submission(capability: str, body: dict[str, Any], routing_header: str | None,
               run_id: str | None) -> JobSubmission:
    if run_id is not None and not 1 <= len(run_id) <= 128:
        raise InvalidRequest("X-Molar-Run-Id must be 1-128 characters", param="X-Molar-Run-Id")
    return JobSubmission(capability=capability, request=body, run_id=run_id,
                         model_routing=parse_routing_header(routing_header))


def parse_routing_header(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        routing = orjson.loads(value)
    except orjson.JSONDecodeError:
        routing = None
    if not isinstance(routing, dict):
        raise InvalidRequest(
            f"{ROUTING_HEADER} must be a JSON object mapping capability keys to "
            '{"provider_integration_id", "model"}', param=ROUTING_HEADER)
    return routing


def check_submission(state: AppState, submission: JobSubmission) -> None:
    """What can be refused before reading the org: the body's shape, the routing header."""
    check_request(submission.capability, submission.request, param="body")
    validate_routing(submission.model_routing, state.deployment.catalog, param=ROUTING_HEADER)


def check_route(catalog: Catalog, request: dict[str, Any], route: Route) -> None:
    """Refuse what the resolved route's model cannot serve, before anything is queued."""
    _check_context(request, route, catalog)
    if route.provider == "anthropic":
        reason = unsupported_reason(request)
        if reason is not None:
            raise InvalidRequest(f"{reason.message} (capability {route.capability!r} is routed "
                                 f"to {route.model!r})", param=reason.param,
                                 code="unsupported_parameter")


def _check_context(request: dict[str, Any], route: Route, catalog: Catalog) -> None:
    window = catalog.get(route.model).context_window
    estimate = estimate_input_tokens(request)
    if estimate > window:
        raise InvalidRequest(
            f"this request holds about {estimate} tokens, more than the {window}-token context "
            f"window of {route.model!r} (capability {route.capability!r}); shorten the "
            "messages or input", param="messages" if "messages" in request else "input",
            code="context_length_exceeded")


def wait_timeout_s(header: str | None, ceiling_s: float) -> float:
    if not header:
        return ceiling_s
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not 0 < value <= ceiling_s:
        raise InvalidRequest(f"X-Molar-Timeout-S must be a number of seconds in (0, "
                             f"{ceiling_s:g}]; got {header!r}", param="X-Molar-Timeout-S")
    return value


# --- after the job -----------------------------------------------------------------------------


def still_running(job_id: str, timeout_s: float, headers: dict[str, str]) -> JSON:
    response = error_response(
        504, f"job {job_id} did not finish within {timeout_s:g}s; it goes on: poll "
        f"GET /v1/jobs/{job_id} for its result", type_="timeout_error", code="wait_timeout")
    response.headers.update(headers)
    return response


def job_error(job: JobOutcome, headers: dict[str, str]) -> JSON:
    if job.status == "cancelled":
        response = error_response(409, f"job {job.id} was cancelled before it finished",
                                  type_="conflict_error", code="job_cancelled")
    else:
        error = job.error or {}
        status = status_for(error)
        response = error_response(
            status, str(error.get("message") or f"job {job.id} failed"),
            type_=ERROR_TYPES.get(status, "server_error"), code=error.get("code"))
    response.headers.update(headers)
    return response


def status_for(error: dict[str, Any]) -> int:
    """The HTTP status of a failed job, so the OpenAI SDK raises the matching exception."""
    code = error.get("code")
    if code in STATUS_BY_CODE:
        return STATUS_BY_CODE[code]
    provider_status = error.get("provider_status")
    if isinstance(provider_status, int):
        return PASSED_THROUGH.get(provider_status, 502)
    return 500


def sse_events(result: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """A finished completion as OpenAI's ``chat.completion.chunk`` events."""
    base = {key: result.get(key) for key in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    if include_usage:
        base["usage"] = None
    for choice in result.get("choices") or []:
        for delta, finish in _deltas(choice.get("message") or {}, choice.get("finish_reason")):
            piece = {"index": choice.get("index", 0), "delta": delta, "logprobs": None,
                     "finish_reason": finish}
            yield _event({**base, "choices": [piece]})
    if include_usage:
        yield _event({**base, "choices": [], "usage": result.get("usage")})
    yield b"data: [DONE]\n\n"


def _deltas(message: dict[str, Any], finish_reason: Any) -> Iterator[tuple[dict[str, Any], Any]]:
    yield {"role": "assistant", "content": ""}, None
    if message.get("content"):
        yield {"content": message["content"]}, None
    for index, call in enumerate(message.get("tool_calls") or []):
        yield {"tool_calls": [{"index": index, **call}]}, None
    yield {}, finish_reason


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
