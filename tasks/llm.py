"""The job tasks: one per capability, each a thin shell around the worker's job runner."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.exc import InterfaceError, OperationalError

from broker.capabilities import CAPABILITIES
from broker.completion_wait import CompletionNotifier
from broker.crypto import CredentialCipher
from broker.db import make_engine, make_sessionmaker
from broker.integrations import IntegrationService
from broker.routing import load_deployment
from broker.settings import get_settings
from tasks.app import app as app
from tasks.app import task_name
from tasks.retry_policy import RetryPolicies
from tasks.scheduler import Scheduler
from workers.credentials import CredentialResolver, store_lookup
from workers.providers.anthropic import AnthropicProvider
from workers.providers.base import Provider
from workers.providers.openai_compat import OpenAICompatibleProvider
from workers.runner import JobRunner

log = logging.getLogger(__name__)
_runner: JobRunner | None = None
_runner_lock = threading.Lock()
_providers: dict[str, Provider] = {}
_schedulers: list[Scheduler] = []
_call_slots: int | None = None


def limit_provider_calls(slots: int | None) -> None:
    """At most ``slots`` provider calls in flight in this process (None: one per thread).
    Set before the first job runs."""
    global _call_slots
    if _runner is not None:
        raise RuntimeError("limit_provider_calls() must run before the first job")
    _call_slots = slots


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
    sessions = make_sessionmaker(engine)
    cipher = CredentialCipher(settings.encryption_keys.get_secret_value())
    store = IntegrationService(sessions, cipher)
    return JobRunner(
        sessions=sessions,
        deployment=deployment,
        providers=dict(_providers),
        credentials=CredentialResolver(settings, byok_lookup=store_lookup(store)),
        worker_name=f"{socket.gethostname()}:{os.getpid()}",
        policies=RetryPolicies.from_settings(settings),
        lease_margin_s=settings.lease_margin_s,
        commit_writers=settings.worker_commit_writers,
        on_finished=CompletionNotifier(settings),
        call_slots=_call_slots,
    )


#: Seconds before a job whose database write failed is put back on its queue.
DATABASE_RETRY_S = 2


def _register(capability: str) -> None:
    @app.task(name=task_name(capability), ignore_result=True, acks_late=True, bind=True)
    def run_job(self: Task, job_id: str) -> None:
        try:
            get_runner().run(job_id)
        except (OperationalError, InterfaceError) as exc:
            # The database blipped or a pooled connection went stale: put the job back
            # rather than dropping its message; the claim keeps a rerun harmless.
            log.warning("job %s requeued after a database error: %s", job_id,
                        type(exc).__name__)
            raise self.retry(countdown=DATABASE_RETRY_S, max_retries=None) from None


for _capability in CAPABILITIES:
    _register(_capability)


@worker_ready.connect
def _start_scheduler(**_: Any) -> None:
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url, pool_size=1, max_overflow=2)
    scheduler = Scheduler(make_sessionmaker(engine), app,
                          interval_s=settings.scheduler_interval_s,
                          resend_s=settings.scheduler_resend_s)
    scheduler.start()
    _schedulers.append(scheduler)


@worker_shutdown.connect
def _close_providers(**_: Any) -> None:
    for scheduler in _schedulers:
        scheduler.stop()
    if _runner is not None:
        _runner.close()
    for provider in set(_providers.values()):
        provider.close()
