"""Liveness and readiness probes."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Header
from sqlalchemy import text

from broker.api.auth import State
from broker.api.responses import JSON

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Any:
    return JSON({"status": "ok"})


@router.get("/readyz")
def readyz(
    state: State, authorization: Annotated[str | None, Header()] = None
) -> Any:
    """200 or 503 for probes, which cannot send credentials; with the service key the body
    also names each dependency's state, so an operator sees which one failed."""
    checks = {"database": _check_database(state), "broker": _check_broker(state)}
    ready = all(value == "ok" for value in checks.values())
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready"}
    if _is_service_key(state, authorization):
        body["checks"] = checks
    return JSON(body, status_code=200 if ready else 503)


def _is_service_key(state: State, authorization: str | None) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    expected = state.settings.service_key.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


def _check_database(state: State) -> str:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"failed: {type(exc).__name__}"
    return "ok"


def _check_broker(state: State) -> str:
    try:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return f"failed: {type(exc).__name__}"
    return "ok"
