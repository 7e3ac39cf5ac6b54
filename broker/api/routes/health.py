"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from broker.api.auth import State
from broker.api.responses import JSON

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Any:
    return JSON({"status": "ok"})


@router.get("/readyz")
def readyz(state: State) -> Any:
    checks = {"database": _check_database(state), "broker": _check_broker(state)}
    ready = all(value == "ok" for value in checks.values())
    return JSON(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


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
