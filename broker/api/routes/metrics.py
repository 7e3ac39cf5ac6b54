"""Operator views: windowed figures per capability and model, and the Prometheus scrape."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from starlette.responses import Response

from broker import prometheus
from broker.api.auth import CurrentPrincipal, Principal, State
from broker.api.responses import JSON
from broker.errors import InvalidRequest, Unauthenticated
from broker.metrics import window_metrics
from tasks.depth import queue_depths

log = logging.getLogger(__name__)
router = APIRouter(tags=["metrics"])
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/api/v1/llm/metrics")
def llm_metrics(
    principal: CurrentPrincipal,
    state: State,
    window: Annotated[Literal["5m", "1h", "24h"], Query()] = "5m",
    org_id: Annotated[str | None, Query(max_length=128)] = None,
) -> Any:
    scope = metrics_scope(principal, org_id)
    depths = _depths_or_none(state)
    with state.sessions() as session:
        body = window_metrics(session, window=window, org_id=scope, queue_depths=depths)
    body["broker"] = "ok" if depths is not None else "unavailable"
    return JSON(body)


def metrics_scope(principal: Principal, org_id: str | None) -> str | None:
    """Which org's jobs count: a BFF token sees its own org; the service key all, or one."""
    if principal.is_service:
        return org_id
    if org_id is not None and org_id != principal.org_id:
        raise InvalidRequest("org_id must be your own org (or be left out) with a BFF token",
                             param="org_id")
    return principal.org_id


@router.get("/metrics")
def prometheus_metrics(
    state: State, authorization: Annotated[str | None, Header()] = None
) -> Response:
    _check_scrape_token(state, authorization)
    return Response(prometheus.render(_depths_or_none(state)),
                    media_type=PROMETHEUS_CONTENT_TYPE)


def _check_scrape_token(state: State, authorization: str | None) -> None:
    scheme, _, token = (authorization or "").partition(" ")
    expected = state.settings.service_key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise Unauthenticated(
            "scraping /metrics needs 'Authorization: Bearer <service key>'",
            code="missing_credentials" if not authorization else None,
        )


def _depths_or_none(state: State) -> dict[str, int] | None:
    try:
        return queue_depths(state.celery)
    except Exception as exc:  # the broker being down must not take the view down with it
        log.warning("queue depths unavailable: %s", type(exc).__name__)
        return None
