"""SQL tables: the record of every job, batch, attempt and token spent (SQL is the truth)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from broker.db import utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonDict = dict[str, Any]
# Cost precision: ten decimal places keeps a millionth of a cent per event exact.
Money = Numeric(20, 10)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class OrgSettings(Base):
    __tablename__ = "org_settings"

    org_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_routing: Mapped[JsonDict] = mapped_column(JSON, default=dict)
    spend_cap_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 6), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(128), index=True)
    run_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="in_progress")
    total: Mapped[int] = mapped_column(Integer)
    model_routing: Mapped[JsonDict | None] = mapped_column(JSON, nullable=True)
    meta: Mapped[JsonDict | None] = mapped_column("metadata", JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_batch_index", "batch_id", "batch_index"),
        Index("ix_jobs_org_created", "org_id", "created_at"),
        Index("ix_jobs_status_capability", "status", "capability"),
        # The metrics view reads jobs and attempts by finish time.
        Index("ix_jobs_finished_at", "finished_at"),
        Index("ix_jobs_status_due", "status", "due_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(128))
    batch_id: Mapped[str | None] = mapped_column(
        String(40), ForeignKey("batches.id", ondelete="CASCADE"), nullable=True
    )
    custom_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    batch_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    capability: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    request: Mapped[JsonDict] = mapped_column(JSON)
    route: Mapped[JsonDict] = mapped_column(JSON)
    meta: Mapped[JsonDict | None] = mapped_column("metadata", JSON, nullable=True)
    result: Mapped[JsonDict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[JsonDict | None] = mapped_column(JSON, nullable=True)
    usage: Mapped[JsonDict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Retries (tasks/scheduler.py): when a `retrying` job is due, when it was last published
    # by the scheduler, whether a cancel waits for the running attempt, and how many attempts
    # came before the last manual retry (the retry budget counts from there).
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    attempt_floor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),
        Index("ix_attempts_finished_at", "finished_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    outcome: Mapped[str] = mapped_column(String(24))
    provider_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Numeric(12, 3), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The provider's answer, kept until the job is finished from it: a worker that dies after
    # the call and before the ledger write leaves it here, and the next claim finishes the
    # job from it instead of calling the provider again.
    result: Mapped[JsonDict | None] = mapped_column(JSON, nullable=True)
    usage: Mapped[JsonDict | None] = mapped_column(JSON, nullable=True)


class UsageEvent(Base):
    """Append-only ledger: one row per provider call that consumed tokens."""

    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", name="uq_usage_events_job_attempt"),
        Index("ix_usage_events_org_created", "org_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(128))
    run_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    job_id: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer)
    capability: Mapped[str] = mapped_column(String(32))
    integration_id: Mapped[str] = mapped_column(String(128))
    billing_kind: Mapped[str] = mapped_column(String(8))
    provider: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128))
    input_tokens: Mapped[int] = mapped_column(Integer)
    cached_input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(Money)
    meters: Mapped[JsonDict] = mapped_column(JSON)
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)



class Integration(Base):
    """A credential an org stored (``byok-*``); the key is kept only as a Fernet token."""

    __tablename__ = "integrations"

    org_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    id: Mapped[str] = mapped_column(String(72), primary_key=True)
    provider: Mapped[str] = mapped_column(String(32))
    base_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    key_ciphertext: Mapped[str] = mapped_column(Text)
    key_hint: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` seen on a submission, per org, with what it created."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("org_id", "key", name="uq_idempotency_keys_org_key"),
        Index("ix_idempotency_keys_expires", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8))
    body_sha256: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SpendPeriod(Base):
    """An org's hosted spend in one calendar month (UTC), in units of 1e-10 USD.

    Integers keep the cap check exact on SQLite too; the conditional UPDATE on this row is
    the one statement that admits a reservation (see ``broker.spend``).
    """

    __tablename__ = "spend_periods"

    org_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    period_start: Mapped[date] = mapped_column(Date, primary_key=True)
    spent_usd_e10: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_usd_e10: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SpendReservation(Base):
    """One hosted attempt's hold on the cap: ``reserved`` -> ``settled`` | ``released``."""

    __tablename__ = "spend_reservations"
    __table_args__ = (Index("ix_spend_reservations_org_state", "org_id", "state"),)

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[str] = mapped_column(String(128))
    period_start: Mapped[date] = mapped_column(Date)
    state: Mapped[str] = mapped_column(String(16))
    estimate_usd_e10: Mapped[int] = mapped_column(BigInteger)
    cost_usd_e10: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
