"""Reading the usage ledger: token meters and cost per group over a time window.

Sums run in SQL. Costs are summed as integers of 1e-10 USD, so totals are exact on SQLite
(which stores NUMERIC as floats) as well as on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from sqlalchemy import BigInteger, Select, case, cast, func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from broker.db import utcnow
from broker.errors import InvalidRequest
from broker.metering import METER_INPUT, METER_OUTPUT, money
from broker.models import UsageEvent
from broker.spend import from_e10, period_start

GROUPS = ("capability", "model", "integration", "billing", "day")
E10 = 10**10


@dataclass(frozen=True)
class UsageQuery:
    start: datetime
    end: datetime | None
    group_by: tuple[str, ...]


def parse_query(start: str | None, end: str | None, group_by: list[str] | None,
                now: datetime | None = None) -> UsageQuery:
    """Validate the query string; errors name the parameter at fault."""
    start_at = parse_instant(start, "start") if start else None
    end_at = parse_instant(end, "end") if end else None
    if start_at is None:
        first = period_start(now or utcnow())
        start_at = datetime.combine(first, time(), tzinfo=UTC)
    if end_at is not None and end_at <= start_at:
        raise InvalidRequest(
            f"end ({end_at.isoformat()}) must be after start ({start_at.isoformat()})",
            param="end",
        )
    return UsageQuery(start_at, end_at, parse_groups(group_by or []))


def parse_instant(value: str, param: str) -> datetime:
    """A date (midnight UTC) or an ISO 8601 date-time; without an offset it is UTC."""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{param} {value[:40]!r} is not a date or date-time; use ISO 8601, e.g. "
            "2026-12-01 or 2026-12-01T00:00:00Z",
            param=param,
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_groups(values: list[str]) -> tuple[str, ...]:
    groups: list[str] = []
    for value in values:
        for name in (part.strip() for part in value.split(",")):
            if name not in GROUPS:
                raise InvalidRequest(
                    f"group_by {name!r} is not a usage dimension; use one or more of: "
                    f"{', '.join(GROUPS)} (repeat the parameter or separate with commas)",
                    param="group_by",
                )
            if name not in groups:
                groups.append(name)
    return tuple(groups)


class UsageService:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    def summarize(self, org_id: str, query: UsageQuery) -> dict[str, Any]:
        with self._sessions() as session:
            dialect = session.get_bind().dialect.name
            columns = [_group_column(name, dialect) for name in query.group_by]
            rows = session.execute(_statement(org_id, query, columns)).all()
        return {
            "object": "llm.usage",
            "org_id": org_id,
            "start": query.start.isoformat(),
            "end": query.end.isoformat() if query.end else None,
            "group_by": list(query.group_by),
            "data": [_row_view(query.group_by, row) for row in rows],
            "totals": _totals(rows),
        }


def _group_column(name: str, dialect: str) -> ColumnElement[Any]:
    if name == "day":
        if dialect == "postgresql":
            day = func.to_char(func.timezone("UTC", UsageEvent.created_at), "YYYY-MM-DD")
        else:  # SQLite keeps UTC date-times as text
            day = func.strftime("%Y-%m-%d", UsageEvent.created_at)
        return day.label("day")
    column = {"capability": UsageEvent.capability, "model": UsageEvent.model,
              "integration": UsageEvent.integration_id, "billing": UsageEvent.billing_kind}[name]
    return column.label(name)


def _statement(org_id: str, query: UsageQuery,
               columns: list[ColumnElement[Any]]) -> Select[Any]:
    cost_e10 = cast(func.round(UsageEvent.cost_usd * E10), BigInteger)
    stmt = select(
        *columns,
        func.count().label("events"),
        func.sum(case((UsageEvent.estimated, 1), else_=0)).label("estimated_events"),
        func.sum(cast(UsageEvent.input_tokens, BigInteger)).label("input_tokens"),
        func.sum(cast(UsageEvent.cached_input_tokens, BigInteger)).label("cached_input_tokens"),
        func.sum(cast(UsageEvent.output_tokens, BigInteger)).label("output_tokens"),
        func.sum(cost_e10).label("cost_usd_e10"),
    ).where(UsageEvent.org_id == org_id, UsageEvent.created_at >= query.start)
    if query.end is not None:
        stmt = stmt.where(UsageEvent.created_at < query.end)
    if columns:
        stmt = stmt.group_by(*columns).order_by(*columns)
    return stmt


COUNTS = ("events", "estimated_events", "input_tokens", "cached_input_tokens", "output_tokens")


def _row_view(groups: tuple[str, ...], row: Any) -> dict[str, Any]:
    counts = {key: int(getattr(row, key) or 0) for key in COUNTS}
    return {"group": {name: getattr(row, name) for name in groups},
            **_amounts(counts, int(row.cost_usd_e10 or 0))}


def _totals(rows: Sequence[Any]) -> dict[str, Any]:
    counts = {key: sum(int(getattr(row, key) or 0) for row in rows) for key in COUNTS}
    return _amounts(counts, sum(int(row.cost_usd_e10 or 0) for row in rows))


def _amounts(counts: dict[str, int], cost_e10: int) -> dict[str, Any]:
    meters = {METER_INPUT: counts["input_tokens"], METER_OUTPUT: counts["output_tokens"]}
    return {**counts, "meters": meters, "cost_usd": money(from_e10(cost_e10))}
