"""The spend ledger against real databases (a SQLite file and PostgreSQL).

Random sequences of reserve, settle, release and abandoned attempts are checked against a
model of the cap; threads race for one cap; calendar months roll over at UTC midnight.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from broker.catalog import cached_catalog
from broker.db import make_engine, make_sessionmaker, transaction
from broker.errors import SpendCapExceeded
from broker.metering import cost_bound
from broker.migrate import upgrade
from broker.models import Job, OrgSettings, SpendPeriod, SpendReservation
from broker.routing import Route
from broker.settings import DEFAULTS_DIR
from broker.spend import SpendLedger, from_e10, period_start, to_e10

CATALOG = cached_catalog(DEFAULTS_DIR / "catalog.toml")
MODEL = "gpt-4.1-mini"
HOSTED = Route("planner", "molar-managed", MODEL, "openai", "default")
BYOK = Route("planner", "byok-team", MODEL, "openai", "org")
MICRO = Decimal("0.000001")
MID_MARCH = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Attempt:
    id: str
    org_id: str
    attempt: int
    route: Route
    request: dict[str, Any] = field(hash=False)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")()
    upgrade(url)
    engine = make_engine(url, pool_size=8, max_overflow=64)
    yield make_sessionmaker(engine)
    engine.dispose()


def new_org(sessions: sessionmaker[Session], cap_usd: Decimal | None) -> str:
    org = f"org_{uuid.uuid4().hex[:12]}"
    with transaction(sessions) as session:
        session.add(OrgSettings(org_id=org, model_routing={}, spend_cap_usd=cap_usd))
    return org


def new_attempt(sessions: sessionmaker[Session], org: str, max_tokens: int,
                route: Route = HOSTED) -> Attempt:
    """A job row that is running its first attempt, as the runner sees it after the claim."""
    request = {"messages": [{"role": "user", "content": "plan"}], "max_tokens": max_tokens}
    job_id = f"job_{uuid.uuid4().hex}"
    with transaction(sessions) as session:
        session.add(Job(id=job_id, org_id=org, capability="planner", status="running",
                        request=request, route=route.to_dict(), attempts=1))
    return Attempt(job_id, org, 1, route, request)


def estimate_e10(attempt: Attempt, now: datetime) -> int:
    return to_e10(cost_bound(CATALOG.get(MODEL), now, attempt.request), rounding=ROUND_CEILING)


def period_row(sessions: sessionmaker[Session], org: str, start: date) -> tuple[int, int]:
    with sessions() as session:
        row = session.get(SpendPeriod, (org, start))
    return (row.spent_usd_e10, row.reserved_usd_e10) if row else (0, 0)


def reservation_sums(sessions: sessionmaker[Session], org: str) -> tuple[int, int]:
    with sessions() as session:
        settled = session.scalar(select(func.coalesce(func.sum(SpendReservation.cost_usd_e10), 0))
                                 .where(SpendReservation.org_id == org,
                                        SpendReservation.state == "settled"))
        held = session.scalar(select(func.coalesce(func.sum(SpendReservation.estimate_usd_e10),
                                                   0))
                              .where(SpendReservation.org_id == org,
                                     SpendReservation.state == "reserved"))
    return int(settled or 0), int(held or 0)


# -- the model-checked property -----------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["reserve", "settle", "release", "abandon", "repeat"]),
              st.integers(0, 7), st.integers(1, 1000)),
    min_size=1, max_size=35,
)


@dataclass
class Model:
    """What the ledger must hold: per attempt its state, estimate and cost (1e-10 USD)."""

    cap_e10: int
    state: dict[int, str] = field(default_factory=dict)
    estimate: dict[int, int] = field(default_factory=dict)
    cost: dict[int, int] = field(default_factory=dict)
    abandoned: set[int] = field(default_factory=set)

    @property
    def spent(self) -> int:
        return sum(self.cost[i] for i, s in self.state.items() if s == "settled")

    @property
    def reserved(self) -> int:
        return sum(self.estimate[i] for i, s in self.state.items() if s == "reserved")

    def fits(self, estimate: int) -> bool:
        return self.spent + self.reserved + estimate <= self.cap_e10

    def reserve(self, i: int, estimate: int) -> bool:
        if self.state.get(i) in ("reserved", "settled"):
            return True
        if not self.fits(estimate) and self.abandoned & self._held():
            for j in self.abandoned & self._held():
                self.state[j] = "released"
        if not self.fits(estimate):
            return False
        self.state[i], self.estimate[i] = "reserved", estimate
        return True

    def _held(self) -> set[int]:
        return {i for i, s in self.state.items() if s == "reserved"}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cap_usd=st.decimals(min_value=0, max_value=Decimal("0.03"), places=6), ops=OPS,
       max_tokens=st.lists(st.integers(1, 4000), min_size=8, max_size=8))
def test_random_reserve_settle_release_sequences_keep_the_cap_and_the_ledger_totals(
    sessions, cap_usd, ops, max_tokens
):
    ledger = SpendLedger(sessions, CATALOG)
    org = new_org(sessions, cap_usd)
    attempts = [new_attempt(sessions, org, n) for n in max_tokens]
    model = Model(cap_e10=to_e10(cap_usd))
    last: tuple[str, int, int] | None = None

    for op, index, per_mille in ops:
        if op == "repeat":
            if last is None:
                continue
            op, index, per_mille = last
        attempt = attempts[index]
        state = model.state.get(index)
        if op == "reserve" and index not in model.abandoned:
            estimate = estimate_e10(attempt, MID_MARCH)
            admitted = model.reserve(index, estimate)
            try:
                ledger.reserve(attempt, now=MID_MARCH)
            except SpendCapExceeded as exc:
                assert not admitted, "the ledger refused what fits the cap"
                assert exc.message.startswith("org LLM spend cap exceeded")
            else:
                assert admitted, "the ledger admitted what exceeds the cap"
        elif op == "settle" and index not in model.abandoned and state in ("reserved", "settled"):
            # The actual cost is at most the reserved bound, as the bound promises.
            cost_e10 = model.estimate[index] * per_mille // 1000
            if state == "reserved":
                model.state[index], model.cost[index] = "settled", cost_e10
            with transaction(sessions) as session:
                ledger.settle(session, attempt, from_e10(cost_e10), now=MID_MARCH)
        elif op == "release" and index not in model.abandoned:
            if state == "reserved":
                model.state[index] = "released"
            with transaction(sessions) as session:
                ledger.release(session, attempt, now=MID_MARCH)
        elif op == "abandon" and state == "reserved":
            # The worker died mid-call and the job ended elsewhere: the hold is an orphan.
            model.abandoned.add(index)
            with transaction(sessions) as session:
                session.execute(update(Job).where(Job.id == attempt.id).values(status="failed"))
        last = (op, index, per_mille)

        spent, reserved = period_row(sessions, org, period_start(MID_MARCH))
        assert (spent, reserved) == (model.spent, model.reserved)
        assert spent + reserved <= model.cap_e10
        assert reservation_sums(sessions, org) == (spent, reserved)


# -- targeted cases ---------------------------------------------------------------------------


def test_a_byok_attempt_never_touches_the_cap(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    org = new_org(sessions, Decimal("0"))
    attempt = new_attempt(sessions, org, 100, route=BYOK)
    ledger.reserve(attempt, now=MID_MARCH)
    with transaction(sessions) as session:
        ledger.settle(session, attempt, Decimal("1.5"), now=MID_MARCH)
    assert period_row(sessions, org, period_start(MID_MARCH)) == (0, 0)
    assert reservation_sums(sessions, org) == (0, 0)


def test_settling_twice_or_after_a_release_counts_the_call_once(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    org = new_org(sessions, Decimal("1"))
    first, second = new_attempt(sessions, org, 100), new_attempt(sessions, org, 100)
    for attempt in (first, second):
        ledger.reserve(attempt, now=MID_MARCH)
    with transaction(sessions) as session:
        ledger.release(session, second, now=MID_MARCH)
    for _ in range(2):
        for attempt in (first, second):
            with transaction(sessions) as session:
                ledger.settle(session, attempt, Decimal("0.0001234567"), now=MID_MARCH)
    assert period_row(sessions, org, period_start(MID_MARCH)) == (2 * 1_234_567, 0)


def test_a_settle_without_a_reservation_is_still_counted_once(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    org = new_org(sessions, None)
    attempt = new_attempt(sessions, org, 100)
    for _ in range(2):
        with transaction(sessions) as session:
            ledger.settle(session, attempt, Decimal("0.25"), now=MID_MARCH)
    assert period_row(sessions, org, period_start(MID_MARCH)) == (to_e10(Decimal("0.25")), 0)


def test_sixty_four_threads_racing_for_one_cap_never_overrun_it(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    sample = new_attempt(sessions, "org_sample", 2000)
    estimate = estimate_e10(sample, MID_MARCH)
    # Caps are stored with six decimal places; this one has room for exactly ten holds.
    cap = from_e10(estimate * 10 + estimate // 2).quantize(MICRO)
    org = new_org(sessions, cap)
    attempts = [new_attempt(sessions, org, 2000) for _ in range(64)]
    admitted: list[Attempt] = []
    barrier = threading.Barrier(len(attempts))

    def run(attempt: Attempt) -> None:
        barrier.wait()
        try:
            ledger.reserve(attempt, now=MID_MARCH)
        except SpendCapExceeded:
            return
        admitted.append(attempt)

    threads = [threading.Thread(target=run, args=(a,)) for a in attempts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 10
    assert period_row(sessions, org, period_start(MID_MARCH)) == (0, 10 * estimate)


def test_holds_claimed_together_are_admitted_together_or_as_many_as_fit(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    estimate = estimate_e10(new_attempt(sessions, "org_sample", 2000), MID_MARCH)
    # Room for exactly two holds of this size: three claimed together cannot all fit.
    org = new_org(sessions, from_e10(estimate * 2 + estimate // 2).quantize(MICRO))
    first = [new_attempt(sessions, org, 2000) for _ in range(2)]
    later = [new_attempt(sessions, org, 2000) for _ in range(2)]
    byok = new_attempt(sessions, org, 2000, route=BYOK)
    with transaction(sessions) as session:
        together = ledger.hold_many(session, first, now=MID_MARCH)
    with transaction(sessions) as session:
        over = ledger.hold_many(session, [later[0], byok, later[1]], now=MID_MARCH)
    assert together == [True, True]
    assert over == [False, True, False]  # BYOK bypasses the cap; no hosted hold fits now
    assert period_row(sessions, org, period_start(MID_MARCH)) == (0, 2 * estimate)
    assert reservation_sums(sessions, org) == (0, 2 * estimate)


def test_a_batch_of_holds_larger_than_the_room_left_admits_those_that_fit(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    estimate = estimate_e10(new_attempt(sessions, "org_sample", 2000), MID_MARCH)
    org = new_org(sessions, from_e10(estimate * 2 + estimate // 2).quantize(MICRO))
    attempts = [new_attempt(sessions, org, 2000) for _ in range(3)]
    with transaction(sessions) as session:
        admitted = ledger.hold_many(session, attempts, now=MID_MARCH)
    assert admitted == [True, True, False]
    assert period_row(sessions, org, period_start(MID_MARCH)) == (0, 2 * estimate)


# -- calendar months ---------------------------------------------------------------------------

LAST_INSTANT_OF_JANUARY = datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC)


@pytest.mark.parametrize(("when", "expected"), [
    pytest.param(LAST_INSTANT_OF_JANUARY, date(2026, 1, 1), id="last-microsecond-of-january"),
    pytest.param(datetime(2026, 2, 1, tzinfo=UTC), date(2026, 2, 1), id="first-instant-of-feb"),
    pytest.param(datetime(2026, 2, 1, 1, 0, tzinfo=timezone(timedelta(hours=2))),
                 date(2026, 1, 1), id="feb-1-01h-at-utc+2-is-still-january"),
    pytest.param(datetime(2026, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5))),
                 date(2027, 1, 1), id="new-year-reached-in-utc-first"),
    pytest.param(datetime(2028, 2, 29, 12, 0, tzinfo=UTC), date(2028, 2, 1), id="leap-day"),
])
def test_the_spend_period_is_the_calendar_month_in_utc(when, expected):
    assert period_start(when) == expected


def test_a_full_month_does_not_block_the_next_one(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    sample = new_attempt(sessions, "org_sample", 1000)
    estimate = estimate_e10(sample, LAST_INSTANT_OF_JANUARY)
    org = new_org(sessions, from_e10(estimate).quantize(MICRO, ROUND_CEILING))
    january, late, february = (new_attempt(sessions, org, 1000) for _ in range(3))

    ledger.reserve(january, now=LAST_INSTANT_OF_JANUARY)
    with transaction(sessions) as session:
        ledger.settle(session, january, from_e10(estimate), now=LAST_INSTANT_OF_JANUARY)
    with pytest.raises(SpendCapExceeded) as refused:
        ledger.reserve(late, now=LAST_INSTANT_OF_JANUARY)
    assert "2026-01-01" in refused.value.message
    ledger.reserve(february, now=LAST_INSTANT_OF_JANUARY + timedelta(microseconds=1))

    assert period_row(sessions, org, date(2026, 1, 1)) == (estimate, 0)
    assert period_row(sessions, org, date(2026, 2, 1)) == (0, estimate)
    snapshot = ledger.snapshot(org, now=datetime(2026, 2, 10, tzinfo=UTC))
    assert (snapshot.period_start, snapshot.spent_usd, snapshot.reserved_usd) == (
        date(2026, 2, 1), Decimal(0), from_e10(estimate))


def test_a_call_settled_after_midnight_counts_in_the_month_that_admitted_it(sessions):
    ledger = SpendLedger(sessions, CATALOG)
    org = new_org(sessions, Decimal("1"))
    attempt = new_attempt(sessions, org, 100)
    ledger.reserve(attempt, now=LAST_INSTANT_OF_JANUARY)
    with transaction(sessions) as session:
        ledger.settle(session, attempt, Decimal("0.01"), now=datetime(2026, 2, 1, 0, 0, 2,
                                                                        tzinfo=UTC))
    assert period_row(sessions, org, date(2026, 1, 1)) == (to_e10(Decimal("0.01")), 0)
    assert period_row(sessions, org, date(2026, 2, 1)) == (0, 0)
