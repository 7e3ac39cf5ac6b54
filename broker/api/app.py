"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from broker import __version__
from broker.api.errors import install_error_handlers
from broker.api.routes import (
    batches,
    health,
    integrations,
    jobs,
    metrics,
    openai,
    orgs,
    usage,
)
from broker.api.state import AppState
from broker.completion_wait import CompletionWaiter
from broker.migrate import ensure_embedded_schema
from broker.prometheus import HttpMetricsMiddleware
from broker.security import refuse_unsafe_secrets
from broker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    refuse_unsafe_secrets(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_embedded_schema(settings)
        app.state.broker = AppState.build(settings)
        app.state.completions = CompletionWaiter(settings, app.state.broker.sessions)
        await app.state.completions.start()
        log.info("broker API ready database=%s", settings.resolved_database_url.split(":")[0])
        yield
        await app.state.completions.stop()
        app.state.broker.close()

    app = FastAPI(title="molar-llm-broker", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(HttpMetricsMiddleware)
    for module in (health, jobs, batches, orgs, integrations, metrics, openai, usage):
        app.include_router(module.router)
    return app
