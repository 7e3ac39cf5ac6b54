"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from broker import __version__
from broker.api.errors import install_error_handlers
from broker.api.routes import batches, health, jobs, orgs, usage
from broker.api.state import AppState
from broker.migrate import ensure_embedded_schema
from broker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_embedded_schema(settings)
        app.state.broker = AppState.build(settings)
        log.info("broker API ready database=%s", settings.resolved_database_url.split(":")[0])
        yield
        app.state.broker.close()

    app = FastAPI(title="molar-llm-broker", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    for module in (health, jobs, batches, orgs, usage):
        app.include_router(module.router)
    return app
