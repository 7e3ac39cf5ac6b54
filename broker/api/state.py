"""What a running API process holds: built once at start-up, reached through dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from broker.control import JobControl
from broker.crypto import CredentialCipher
from broker.db import make_engine, make_sessionmaker
from broker.idempotency import IdempotentSubmissions
from broker.integrations import IntegrationService
from broker.jobs import JobService
from broker.orgs import OrgService
from broker.routing import Deployment, load_deployment
from broker.settings import Settings
from broker.spend import SpendLedger
from broker.usage import UsageService
from tasks.app import create_celery_app


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    deployment: Deployment
    celery: Celery
    orgs: OrgService
    jobs: JobService
    integrations: IntegrationService
    control: JobControl
    submissions: IdempotentSubmissions
    spend: SpendLedger
    usage: UsageService

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        engine = make_engine(settings.resolved_database_url, pool_size=10, max_overflow=40)
        sessions = make_sessionmaker(engine)
        deployment = load_deployment(settings.catalog_file, settings.routing_defaults_file)
        celery = create_celery_app(settings)
        orgs = OrgService(sessions, deployment)
        spend = SpendLedger(sessions, deployment.catalog)
        jobs = JobService(
            sessions, deployment, celery, orgs, max_batch_items=settings.max_batch_items,
            spend=spend,
        )
        cipher = CredentialCipher(settings.encryption_keys.get_secret_value())
        integrations = IntegrationService(sessions, cipher)
        control = JobControl(sessions, celery, jobs)
        submissions = IdempotentSubmissions(sessions, ttl_s=settings.idempotency_ttl_s)
        return cls(settings, engine, sessions, deployment, celery, orgs, jobs, integrations,
                   control, submissions, spend, UsageService(sessions))

    def close(self) -> None:
        self.engine.dispose()
