"""Hosted spend per org and calendar month (UTC): admission, reservation, settlement.

A hosted attempt ``reserve``s an upper bound of its cost before the provider call; one
conditional UPDATE on the org's period row admits it only if spent + reserved + estimate
stays within the cap, so concurrent workers cannot overrun it. ``settle`` swaps the hold for
the actual cost inside the transaction that writes the usage event; ``release`` drops it
when the attempt fails. All three are idempotent per (job, attempt). BYOK routes bypass it.

The period row is every job's meeting point, so it is touched as little and as late as
possible: changes that need no cap check (settling, releasing, holding for an org without a
cap) are summed per row in the session and applied by one UPDATE just before COMMIT, so the
row lock lasts one statement and a commit, whatever else the transaction does. Deferring
them only makes a cap check in the same transaction see more reserved than there is.

Amounts are integers of 1e-10 USD (the ledger's precision), exact on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    String,
    Table,
    and_,
    bindparam,
    cast,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from broker.catalog import Catalog
from broker.db import transaction, utcnow
from broker.errors import SpendCapExceeded
from broker.metering import cost_bound, money
from broker.models import Job, OrgSettings, SpendPeriod, SpendReservation
from broker.routing import Route
from broker.sqlutil import insert_ignoring_conflicts

log = logging.getLogger(__name__)

E10 = Decimal(10) ** 10
RESERVED, SETTLED, RELEASED = "reserved", "settled", "released"
#: ``session.info`` keys: period-row changes waiting for COMMIT, and caps read in this
#: transaction.
_PENDING = "molar.spend.pending"
_CAPS = "molar.spend.caps"


class DispatchedJob(Protocol):
    """What the runner knows about the attempt it is about to run."""

    @property
    def id(self) -> str: ...
    @property
    def org_id(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def route(self) -> Route: ...
    @property
    def request(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SpendSnapshot:
    org_id: str
    period_start: date
    cap_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.cap_usd is None:
            return None
        return max(self.cap_usd - self.spent_usd - self.reserved_usd, Decimal(0))

    @property
    def cap_reached(self) -> bool:
        return self.cap_usd is not None and self.spent_usd >= self.cap_usd


class _Refused(Exception):
    """Rolls back a reservation the cap did not admit."""


def period_start(when: datetime) -> date:
    """First day of the calendar month (UTC) holding ``when``."""
    day = when.astimezone(UTC).date()
    return day.replace(day=1)


def next_period_start(start: date) -> date:
    return date(start.year + 1, 1, 1) if start.month == 12 else date(start.year, start.month + 1, 1)


def to_e10(amount_usd: Decimal, *, rounding: str = ROUND_HALF_UP) -> int:
    return int((amount_usd * E10).to_integral_value(rounding=rounding))


def from_e10(amount_e10: int) -> Decimal:
    return Decimal(amount_e10) / E10


class SpendLedger:
    def __init__(self, sessions: sessionmaker[Session], catalog: Catalog):
        self._sessions = sessions
        self._catalog = catalog
        # Period rows seen committed; they are never deleted, so a hit skips the insert
        # (whose conflict check would wait on every transaction holding the row).
        self._known_periods: set[tuple[str, date]] = set()

    # -- reading ------------------------------------------------------------------------

    def snapshot(self, org_id: str, now: datetime | None = None) -> SpendSnapshot:
        with self._sessions() as session:
            return _snapshot(session, org_id, period_start(now or utcnow()))

    def check_admission(self, org_id: str, routes: Iterable[Route],
                        session: Session | None = None) -> None:
        """At submission: refuse hosted work once this month's hosted spend reached the cap.

        With ``session``, read in the caller's transaction (the one that writes the jobs)."""
        hosted = sorted({r.capability for r in routes if r.billing_kind == "hosted"})
        if not hosted:
            return
        if session is None:
            with self._sessions() as own:
                _refuse_when_capped(own, org_id, hosted)
        else:
            _refuse_when_capped(session, org_id, hosted)

    # -- the three steps of a hosted attempt ---------------------------------------------

    def hold(self, session: Session, job: DispatchedJob, now: datetime | None = None) -> bool:
        """In the transaction that claims a new attempt: hold its cost bound if the cap
        admits it. False leaves nothing written; :meth:`reserve` then frees orphaned holds,
        tries again and explains a refusal."""
        return self.hold_many(session, [job], now)[0]

    def hold_many(self, session: Session, jobs: Sequence[DispatchedJob],
                  now: datetime | None = None) -> list[bool]:
        """:meth:`hold` for several new attempts, with one insert for all their holds.

        An org's holds are admitted together by one conditional update when their sum fits
        its cap; when it does not, one by one, so as many fit as would have alone."""
        now = now or utcnow()
        start = period_start(now)
        admitted = [True] * len(jobs)
        by_org: dict[str, list[tuple[int, int]]] = {}  # org -> [(index in jobs, estimate)]
        for index, job in enumerate(jobs):
            if job.route.billing_kind == "hosted":
                by_org.setdefault(job.org_id, []).append((index, self._estimate_e10(job, now)))
        holds: list[dict[str, Any]] = []
        for org_id, wanted in by_org.items():
            self._ensure_period(session, org_id, start, now)
            together = len(wanted) > 1 and _admit(session, org_id, start,
                                                  sum(e for _, e in wanted), now)
            for index, estimate_e10 in wanted:
                if not together and not _admit(session, org_id, start, estimate_e10, now):
                    admitted[index] = False
                    continue
                job = jobs[index]
                # A claim numbers a new attempt, so no hold of it can exist yet.
                holds.append({"job_id": job.id, "attempt": job.attempt, "org_id": org_id,
                              "period_start": start, "state": RESERVED,
                              "estimate_usd_e10": estimate_e10, "created_at": now})
        if holds:
            session.connection().execute(_INSERT_HOLD, holds)
        return admitted

    def reserve(self, job: DispatchedJob, now: datetime | None = None) -> None:
        """Hold an upper bound of the attempt's cost; raise SpendCapExceeded if it won't fit."""
        if job.route.billing_kind != "hosted":
            return
        now = now or utcnow()
        estimate_e10 = self._estimate_e10(job, now)
        start = period_start(now)
        if self._try_reserve(job, start, estimate_e10, now):
            return
        # Holds of attempts that died without settling may be what blocks: free and retry.
        if self.release_orphans(job.org_id, now) and self._try_reserve(
            job, start, estimate_e10, now
        ):
            return
        snap = self.snapshot(job.org_id, now)
        log.warning("job %s refused attempt=%d org=%s estimate_usd=%s spent_usd=%s "
                    "reserved_usd=%s cap_usd=%s", job.id, job.attempt, job.org_id,
                    money(from_e10(estimate_e10)), money(snap.spent_usd),
                    money(snap.reserved_usd), snap.cap_usd)
        raise SpendCapExceeded(_cap_message(snap, [job.route.capability],
                                            estimate_usd=from_e10(estimate_e10)))

    def settle(self, session: Session, job: DispatchedJob, cost_usd: Decimal,
               now: datetime | None = None) -> None:
        """Replace the attempt's hold by its actual cost, in the caller's transaction."""
        self.settle_many(session, [(job, cost_usd)], now)

    def settle_many(self, session: Session, calls: Sequence[tuple[DispatchedJob, Decimal]],
                    now: datetime | None = None) -> None:
        """:meth:`settle` for several attempts: one read of their holds, one batch of
        updates."""
        now = now or utcnow()
        hosted = [(job, to_e10(cost)) for job, cost in calls
                  if job.route.billing_kind == "hosted"]
        if not hosted:
            return
        conn = session.connection()
        # Locked, so an orphan sweep cannot release a hold between this read and the update.
        found = {(row.job_id, row.attempt): row for row in conn.execute(
            _READ_HOLDS, {"b_job_ids": sorted({job.id for job, _ in hosted})})}
        updates: list[dict[str, Any]] = []
        for job, cost_e10 in hosted:
            row = found.get((job.id, job.attempt))
            if row is None:
                self._settle_unreserved(session, job, cost_e10, now)
                continue
            if row.state == SETTLED:
                continue  # settled before: the call counts once
            # A hold released meanwhile (orphan sweep) no longer counts as reserved, but the
            # call still happened, so its cost still counts.
            held_e10 = row.estimate_usd_e10 if row.state == RESERVED else 0
            updates.append({"b_job_id": job.id, "b_attempt": job.attempt, "b_from": row.state,
                            "b_to": SETTLED, "b_now": now, "b_cost": cost_e10})
            _move(session, job.org_id, row.period_start, spent_e10=cost_e10,
                  reserved_e10=-held_e10, now=now)
        if updates:
            conn.execute(_SET_HOLD_STATE, updates)

    def release(self, session: Session, job: DispatchedJob, now: datetime | None = None) -> None:
        """Drop the attempt's hold (it failed before costing anything), in the caller's
        transaction."""
        now = now or utcnow()
        held = _finish(session, job, RESERVED, RELEASED, now, None)
        if held is not None:
            _move(session, job.org_id, held[0], spent_e10=0, reserved_e10=-held[1], now=now)

    def release_orphans(self, org_id: str, now: datetime | None = None) -> int:
        """Release holds whose attempt is over: the job moved on, finished or vanished."""
        now = now or utcnow()
        live = and_(Job.status == "running", Job.attempts == SpendReservation.attempt)
        stmt = (
            select(SpendReservation.job_id, SpendReservation.attempt,
                   SpendReservation.org_id)
            .outerjoin(Job, Job.id == SpendReservation.job_id)
            .where(SpendReservation.org_id == org_id, SpendReservation.state == RESERVED,
                   or_(Job.id.is_(None), ~live))
        )
        with self._sessions() as session:
            orphans = session.execute(stmt).all()
        released = 0
        for row in orphans:
            with transaction(self._sessions) as session:
                held = _finish(session, _Key(row.job_id, row.org_id, row.attempt), RESERVED,
                               RELEASED, now, None)
                if held is not None:
                    _move(session, org_id, held[0], spent_e10=0, reserved_e10=-held[1], now=now)
                    released += 1
        if released:
            log.info("released %d orphaned spend hold(s) org=%s", released, org_id)
        return released

    # -- internals ----------------------------------------------------------------------

    def _estimate_e10(self, job: DispatchedJob, now: datetime) -> int:
        model = self._catalog.get(job.route.model)
        return to_e10(cost_bound(model, now, job.request), rounding=ROUND_CEILING)

    def _ensure_period(self, session: Session, org_id: str, start: date,
                       now: datetime) -> None:
        key = (org_id, start)
        if key in self._known_periods:
            return
        if not _ensure_period(session, org_id, start, now):
            # Not inserted: it is there, committed (a conflict waits for the inserter).
            self._known_periods.add(key)

    def _try_reserve(self, job: DispatchedJob, start: date, estimate_e10: int,
                     now: datetime) -> bool:
        try:
            with transaction(self._sessions) as session:
                self._ensure_period(session, job.org_id, start, now)
                inserted = insert_ignoring_conflicts(session, SpendReservation.__table__, {  # type: ignore[arg-type]
                    "job_id": job.id, "attempt": job.attempt, "org_id": job.org_id,
                    "period_start": start, "state": RESERVED,
                    "estimate_usd_e10": estimate_e10, "created_at": now,
                }, ("job_id", "attempt"))
                if not inserted and not _rearm(session, job, start, estimate_e10, now):
                    return True  # this attempt already holds (or settled) its reservation
                if not _admit(session, job.org_id, start, estimate_e10, now):
                    raise _Refused
        except _Refused:
            return False
        return True

    def _settle_unreserved(self, session: Session, job: DispatchedJob, cost_e10: int,
                           now: datetime) -> None:
        # An attempt that never reserved (e.g. recovered after a crash): record and count it.
        start = period_start(now)
        self._ensure_period(session, job.org_id, start, now)
        inserted = insert_ignoring_conflicts(session, SpendReservation.__table__, {  # type: ignore[arg-type]
            "job_id": job.id, "attempt": job.attempt, "org_id": job.org_id,
            "period_start": start, "state": SETTLED, "estimate_usd_e10": 0,
            "cost_usd_e10": cost_e10, "created_at": now, "finished_at": now,
        }, ("job_id", "attempt"))
        if inserted:
            _move(session, job.org_id, start, spent_e10=cost_e10, reserved_e10=0, now=now)


@dataclass(frozen=True)
class _Key:
    id: str
    org_id: str
    attempt: int


class _Attempt(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def attempt(self) -> int: ...


_periods = typing.cast(Table, SpendPeriod.__table__)
_holds = typing.cast(Table, SpendReservation.__table__)
# Read as text: SQLite keeps NUMERIC as a float, and its text form is the exact input.
_READ_CAP = select(cast(OrgSettings.spend_cap_usd, String)).where(
    OrgSettings.org_id == bindparam("org_id"))
# RETURNING makes SQLAlchemy send many rows as one INSERT with many VALUES, not one each.
_INSERT_HOLD = _holds.insert().returning(_holds.c.job_id)
_READ_PERIOD = select(_periods.c.spent_usd_e10, _periods.c.reserved_usd_e10).where(
    _periods.c.org_id == bindparam("b_org_id"), _periods.c.period_start == bindparam("b_start"))
_MOVE = (
    update(_periods)
    .where(_periods.c.org_id == bindparam("b_org_id"),
           _periods.c.period_start == bindparam("b_start"))
    .values(spent_usd_e10=_periods.c.spent_usd_e10 + bindparam("b_spent"),
            reserved_usd_e10=_periods.c.reserved_usd_e10 + bindparam("b_reserved"),
            updated_at=bindparam("b_now"))
)
_FINISH_HOLD = (
    update(_holds)
    .where(_holds.c.job_id == bindparam("b_job_id"), _holds.c.attempt == bindparam("b_attempt"),
           _holds.c.state == bindparam("b_from"))
    .values(state=bindparam("b_to"), finished_at=bindparam("b_now"),
            cost_usd_e10=func.coalesce(bindparam("b_cost", type_=BigInteger),
                                       _holds.c.cost_usd_e10))
    .returning(_holds.c.period_start, _holds.c.estimate_usd_e10)
)
_SET_HOLD_STATE = (
    update(_holds)
    .where(_holds.c.job_id == bindparam("b_job_id"), _holds.c.attempt == bindparam("b_attempt"),
           _holds.c.state == bindparam("b_from"))
    .values(state=bindparam("b_to"), finished_at=bindparam("b_now"),
            cost_usd_e10=bindparam("b_cost"))
)
_READ_HOLDS = (
    select(_holds.c.job_id, _holds.c.attempt, _holds.c.state, _holds.c.period_start,
           _holds.c.estimate_usd_e10)
    .where(_holds.c.job_id.in_(bindparam("b_job_ids", expanding=True)))
    .with_for_update()
)
_ADMIT = (
    update(_periods)
    .where(_periods.c.org_id == bindparam("b_org_id"),
           _periods.c.period_start == bindparam("b_start"),
           _periods.c.spent_usd_e10 + _periods.c.reserved_usd_e10 + bindparam("b_estimate")
           <= bindparam("b_cap"))
    .values(reserved_usd_e10=_periods.c.reserved_usd_e10 + bindparam("b_estimate"),
            updated_at=bindparam("b_now"))
    .returning(_periods.c.org_id)
)


def _read_cap(session: Session, org_id: str) -> Decimal | None:
    """The org's cap, read once per transaction."""
    caps: dict[str, Decimal | None] = session.info.setdefault(_CAPS, {})
    if org_id not in caps:
        text = session.connection().execute(_READ_CAP, {"org_id": org_id}).scalar()
        caps[org_id] = Decimal(text) if text is not None else None
    return caps[org_id]


def _refuse_when_capped(session: Session, org_id: str, hosted: list[str]) -> None:
    if _read_cap(session, org_id) is None:
        return  # no cap, nothing to refuse: the period row need not be read
    snap = _snapshot(session, org_id, period_start(utcnow()))
    if snap.cap_reached:
        raise SpendCapExceeded(_cap_message(snap, hosted))


def _snapshot(session: Session, org_id: str, start: date) -> SpendSnapshot:
    cap = _read_cap(session, org_id)
    row = session.connection().execute(_READ_PERIOD, {"b_org_id": org_id,
                                                      "b_start": start}).one_or_none()
    spent, reserved = (row.spent_usd_e10, row.reserved_usd_e10) if row else (0, 0)
    return SpendSnapshot(org_id, start, cap, from_e10(spent), from_e10(reserved))


def _ensure_period(session: Session, org_id: str, start: date, now: datetime) -> bool:
    """Create the period row if missing; True when this call created it."""
    return insert_ignoring_conflicts(session, _periods, {
        "org_id": org_id, "period_start": start, "spent_usd_e10": 0, "reserved_usd_e10": 0,
        "updated_at": now,
    }, ("org_id", "period_start"))


def _rearm(session: Session, job: DispatchedJob, start: date, estimate_e10: int,
           now: datetime) -> bool:
    """Reuse a released hold of the same attempt; False when it is still held or settled."""
    result = session.execute(
        update(SpendReservation)
        .where(SpendReservation.job_id == job.id, SpendReservation.attempt == job.attempt,
               SpendReservation.state == RELEASED)
        .values(state=RESERVED, period_start=start, estimate_usd_e10=estimate_e10,
                finished_at=None, created_at=now)
        .returning(SpendReservation.job_id)
    )
    return result.first() is not None


def _admit(session: Session, org_id: str, start: date, estimate_e10: int,
           now: datetime) -> bool:
    """The one atomic statement: add the hold only if spent + reserved + it fits the cap.

    Without a cap there is nothing to check, and the hold joins the changes applied at
    COMMIT."""
    cap = _read_cap(session, org_id)
    if cap is None:
        _move(session, org_id, start, spent_e10=0, reserved_e10=estimate_e10, now=now)
        return True
    return session.connection().execute(_ADMIT, {
        "b_org_id": org_id, "b_start": start, "b_estimate": estimate_e10,
        "b_cap": to_e10(cap, rounding=ROUND_HALF_UP), "b_now": now,
    }).first() is not None


def _finish(session: Session, job: _Attempt, from_state: str, to_state: str, now: datetime,
            cost_e10: int | None) -> tuple[date, int] | None:
    """Move a hold between states; (period, estimate) when this call made the move."""
    row = session.connection().execute(_FINISH_HOLD, {
        "b_job_id": job.id, "b_attempt": job.attempt, "b_from": from_state, "b_to": to_state,
        "b_now": now, "b_cost": cost_e10,
    }).one_or_none()
    return (row.period_start, row.estimate_usd_e10) if row is not None else None


def _move(session: Session, org_id: str, start: date, *, spent_e10: int, reserved_e10: int,
          now: datetime) -> None:
    """Add to the period row's totals when this transaction commits."""
    pending: dict[tuple[str, date], list[Any]] = session.info.setdefault(_PENDING, {})
    totals = pending.setdefault((org_id, start), [0, 0, now])
    totals[0] += spent_e10
    totals[1] += reserved_e10
    totals[2] = max(totals[2], now)


@event.listens_for(Session, "before_commit")
def _apply_pending(session: Session) -> None:
    """One UPDATE per touched period row, in key order (so two committers cannot deadlock
    on each other's rows), as the last statements before COMMIT."""
    pending = session.info.pop(_PENDING, None)
    session.info.pop(_CAPS, None)
    for (org_id, start), (spent, reserved, now) in sorted(pending.items()) if pending else ():
        if spent or reserved:
            session.connection().execute(_MOVE, {"b_org_id": org_id, "b_start": start,
                                                 "b_spent": spent, "b_reserved": reserved,
                                                 "b_now": now})


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)
    session.info.pop(_CAPS, None)


def _cap_message(snap: SpendSnapshot, capabilities: list[str],
                 estimate_usd: Decimal | None = None) -> str:
    cap = money(snap.cap_usd) if snap.cap_usd is not None else "none"
    needed = f"; this call may cost up to ${money(estimate_usd)}" if estimate_usd else ""
    return (
        f"org LLM spend cap exceeded: hosted (molar-managed) spend for the month from "
        f"{snap.period_start.isoformat()} (UTC) is ${money(snap.spent_usd)} spent and "
        f"${money(snap.reserved_usd)} reserved of the ${cap} cap{needed}. Add a BYOK "
        f"integration and route {', '.join(capabilities)} to it, or raise spend_cap_usd "
        f"with PUT /v1/orgs/{snap.org_id}/settings"
    )
