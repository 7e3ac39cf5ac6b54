"""The job tasks: one per capability, each a thin shell around the worker's job runner."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery.signals import worker_shutdown

from broker.capabilities import CAPABILITIES
from broker.completion_wait import CompletionNotifier
from broker.db import make_engine, make_sessionmaker
from broker.routing import load_deployment
from broker.settings import get_settings
from tasks.app import app as app
from tasks.app import task_name
from workers.credentials import CredentialResolver
from workers.providers.anthropic import AnthropicProvider
from workers.providers.base import Provider
from workers.providers.openai_compat import OpenAICompatibleProvider
from workers.runner import JobRunner

log = logging.getLogger(__name__)
_runner: JobRunner | None = None
_runner_lock = threading.Lock()
_providers: dict[str, Provider] = {}


def get_runner() -> JobRunner:
    """The process's runner, built on first use (after any fork) and shared by its threads."""
    global _runner
    if _runner is None:
        with _runner_lock:
            if _runner is None:
                _runner = _build_runner()
    return _runner


def _build_runner() -> JobRunner:
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url, pool_size=8, max_overflow=64)
    openai = OpenAICompatibleProvider(
        connect_timeout_s=settings.provider_connect_timeout_s,
        read_timeout_s=settings.provider_read_timeout_s,
        max_connections=settings.provider_max_connections,
    )
    deployment = load_deployment(settings.catalog_file, settings.routing_defaults_file)
    anthropic = AnthropicProvider(
        catalog=deployment.catalog,
        connect_timeout_s=settings.provider_connect_timeout_s,
        read_timeout_s=settings.provider_read_timeout_s,
        max_connections=settings.provider_max_connections,
    )
    _providers.update({"openai": openai, "openai_compatible": openai, "anthropic": anthropic})
    return JobRunner(
        sessions=make_sessionmaker(engine),
        deployment=deployment,
        providers=dict(_providers),
        credentials=CredentialResolver(settings),
        worker_name=f"{socket.gethostname()}:{os.getpid()}",
        attempt_deadline_s=settings.attempt_deadline_s,
        on_finished=CompletionNotifier(settings),
    )


def _register(capability: str) -> None:
    @app.task(name=task_name(capability), ignore_result=True, acks_late=True)
    def run_job(job_id: str) -> None:
        get_runner().run(job_id)


for _capability in CAPABILITIES:
    _register(_capability)


@worker_shutdown.connect
def _close_providers(**_: Any) -> None:
    for provider in set(_providers.values()):
        provider.close()
