"""Latency and error figures per capability and model over a time window, read from SQL.

Everything here is computed from the job and attempt rows, so every API replica gives the
same answer and a restart loses nothing. PostgreSQL computes percentiles itself
(``percentile_cont``); SQLite has no such aggregate, so there the values are fetched and
interpolated the same way in Python.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, func, literal, select
from sqlalchemy.orm import Session

from broker.capabilities import CAPABILITIES, queue_name
from broker.db import utcnow
from broker.models import Attempt, Job

WINDOWS: dict[str, timedelta] = {
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
}
PERCENTILES = (0.5, 0.95, 0.99)
LATENCY_KINDS = ("end_to_end", "provider", "queue_wait")
WAITING = ("queued", "retrying")

GroupKey = tuple[str, ...]


def percentile_cont(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks: PostgreSQL's ``percentile_cont``."""
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "p50": _ms(self.p50_ms), "p95": _ms(self.p95_ms),
                "p99": _ms(self.p99_ms)}


NO_LATENCY = Latency(0, None, None, None)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


class WindowQuery:
    """The aggregate queries of one window, optionally limited to one org."""

    def __init__(self, session: Session, *, since: datetime, org_id: str | None):
        self._session = session
        self._since = since
        self._org_id = org_id
        self._dialect = session.get_bind().dialect.name
        self._model = Job.route["model"].as_string()

    def _scoped(self, *conditions: ColumnElement[bool]) -> list[ColumnElement[bool]]:
        if self._org_id is not None:
            return [*conditions, Job.org_id == self._org_id]
        return list(conditions)

    def _groups(self, by_model: bool) -> list[Any]:
        return [Job.capability, self._model] if by_model else [Job.capability]

    def status_counts(self, by_model: bool) -> dict[GroupKey, dict[str, int]]:
        """Jobs that ended in the window, by final status."""
        groups = self._groups(by_model)
        stmt = (
            select(*groups, Job.status, func.count())
            .where(*self._scoped(Job.finished_at >= self._since,
                                 Job.status.in_(("succeeded", "failed", "cancelled"))))
            .group_by(*groups, Job.status)
        )
        counts: dict[GroupKey, dict[str, int]] = defaultdict(dict)
        for *key, status, n in self._session.execute(stmt):
            counts[tuple(key)][status] = int(n)
        return counts

    def attempt_counts(self, by_model: bool) -> dict[GroupKey, tuple[int, int]]:
        """Provider calls that ended in the window: (all, not succeeded)."""
        groups = self._groups(by_model)
        failed = func.sum(case((Attempt.outcome != "succeeded", 1), else_=0))
        stmt = (
            select(*groups, func.count(), failed)
            .join(Attempt, Attempt.job_id == Job.id)
            .where(*self._scoped(Attempt.finished_at >= self._since))
            .group_by(*groups)
        )
        return {tuple(key): (int(n), int(bad or 0))
                for *key, n, bad in self._session.execute(stmt)}

    def live_counts(self, by_model: bool) -> dict[GroupKey, dict[str, int]]:
        """Jobs running or waiting right now (no window: this is the present)."""
        groups = self._groups(by_model)
        stmt = (
            select(*groups, Job.status, func.count())
            .where(*self._scoped(Job.status.in_(("running", *WAITING))))
            .group_by(*groups, Job.status)
        )
        counts: dict[GroupKey, dict[str, int]] = defaultdict(dict)
        for *key, status, n in self._session.execute(stmt):
            counts[tuple(key)][status] = int(n)
        return counts

    def latencies(self, kind: str, by_model: bool) -> dict[GroupKey, Latency]:
        source = self._latency_source(kind)
        groups = self._groups(by_model)
        if self._dialect == "postgresql":
            return self._sql_percentiles(source, groups)
        return self._python_percentiles(source, groups)

    def _latency_source(self, kind: str) -> _Source:
        ended = [Job.finished_at >= self._since, Job.status.in_(("succeeded", "failed"))]
        if kind == "end_to_end":
            return _Source(Job.finished_at, Job.created_at, ended)
        if kind == "queue_wait":
            # Over the same jobs as end to end, so the two read side by side.
            return _Source(Job.started_at, Job.created_at, [*ended, Job.started_at.is_not(None)])
        return _Source(Attempt.latency_ms, None, [Attempt.finished_at >= self._since,
                                                  Attempt.latency_ms.is_not(None)], join=True)

    def _select(self, columns: list[Any], source: _Source) -> Any:
        stmt = select(*columns).select_from(Job)
        if source.join:
            stmt = stmt.join(Attempt, Attempt.job_id == Job.id)
        return stmt.where(*self._scoped(*source.conditions))

    def _sql_percentiles(self, source: _Source, groups: list[Any]) -> dict[GroupKey, Latency]:
        value = source.value
        if source.start is not None:
            value = func.extract("epoch", source.value - source.start) * 1000
        quantiles = [func.percentile_cont(p).within_group(value) for p in PERCENTILES]
        stmt = self._select([*groups, func.count(), *quantiles], source).group_by(*groups)
        result = {}
        for row in self._session.execute(stmt):
            *key, n, p50, p95, p99 = row
            result[tuple(key)] = Latency(int(n), _float(p50), _float(p95), _float(p99))
        return result

    def _python_percentiles(self, source: _Source, groups: list[Any]) -> dict[GroupKey, Latency]:
        # SQLite's date functions keep whole milliseconds; subtract the stored values here.
        start = source.start if source.start is not None else literal(None)
        values: dict[GroupKey, list[float]] = defaultdict(list)
        for *key, end, begin in self._session.execute(
            self._select([*groups, source.value, start], source)
        ):
            sample = float(end) if begin is None else (end - begin).total_seconds() * 1000
            values[tuple(key)].append(sample)
        return {key: Latency(len(found), *(percentile_cont(found, p) for p in PERCENTILES))
                for key, found in values.items()}


@dataclass(frozen=True)
class _Source:
    """A latency: ``value`` in ms, or the time from ``start`` to ``value``; which rows count."""

    value: Any
    start: Any
    conditions: list[ColumnElement[bool]]
    join: bool = False


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Figures:
    """Everything known about one (capability) or (capability, model) group."""

    statuses: dict[str, int]
    attempts: tuple[int, int]
    live: dict[str, int]
    latency: dict[str, Latency]

    def to_dict(self) -> dict[str, Any]:
        succeeded = self.statuses.get("succeeded", 0)
        errors = self.statuses.get("failed", 0)
        requests = succeeded + errors
        return {
            "requests": requests,
            "succeeded": succeeded,
            "errors": errors,
            "error_rate": round(errors / requests, 6) if requests else 0.0,
            "cancelled": self.statuses.get("cancelled", 0),
            "attempts": self.attempts[0],
            "attempt_errors": self.attempts[1],
            "in_flight": self.live.get("running", 0),
            "waiting": sum(self.live.get(status, 0) for status in WAITING),
            "latency_ms": {kind: self.latency[kind].to_dict() for kind in LATENCY_KINDS},
        }


def _collect(query: WindowQuery, by_model: bool) -> dict[GroupKey, Figures]:
    statuses = query.status_counts(by_model)
    attempts = query.attempt_counts(by_model)
    live = query.live_counts(by_model)
    latencies = {kind: query.latencies(kind, by_model) for kind in LATENCY_KINDS}
    keys: set[GroupKey] = set(statuses) | set(attempts) | set(live)
    for found in latencies.values():
        keys |= set(found)
    return {
        key: Figures(statuses.get(key, {}), attempts.get(key, (0, 0)), live.get(key, {}),
                     {kind: latencies[kind].get(key, NO_LATENCY) for kind in LATENCY_KINDS})
        for key in keys
    }


def window_metrics(session: Session, *, window: str, org_id: str | None,
                   queue_depths: dict[str, int] | None,
                   capabilities: Iterable[str] = CAPABILITIES,
                   now: datetime | None = None) -> dict[str, Any]:
    """The ``GET /api/v1/llm/metrics`` body: one entry per capability, models nested."""
    until = now or utcnow()
    since = until - WINDOWS[window]
    query = WindowQuery(session, since=since, org_id=org_id)
    per_capability = _collect(query, by_model=False)
    per_model = _collect(query, by_model=True)
    empty = Figures({}, (0, 0), {}, dict.fromkeys(LATENCY_KINDS, NO_LATENCY))
    entries = []
    for capability in capabilities:
        entry: dict[str, Any] = {
            "capability": capability,
            "queue": queue_name(capability),
            "queue_depth": None if queue_depths is None else queue_depths.get(capability, 0),
            **per_capability.get((capability,), empty).to_dict(),
        }
        models = sorted((key[1], figures) for key, figures in per_model.items()
                        if key[0] == capability)
        entry["models"] = [{"model": model, **figures.to_dict()} for model, figures in models]
        entries.append(entry)
    return {
        "object": "llm.metrics",
        "window": window,
        "window_s": int(WINDOWS[window].total_seconds()),
        "since": since.isoformat(),
        "until": until.isoformat(),
        "org_id": org_id,
        "capabilities": entries,
    }
