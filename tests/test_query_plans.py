"""The worker's key lookups stay on the primary key when PostgreSQL's statistics are stale.

A jobs table analysed while it held only finished jobs, then given a large batch, is what a
young deployment sees for its first minute: the planner believes `status = 'queued'` matches
one row. Planned that way, every claim and finish would read every queued job through a
status index. Each hot statement is planned here (EXPLAIN) against such a table.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from broker.db import make_engine, utcnow
from broker.migrate import upgrade
from workers import runner

QUEUED = 5000


@pytest.fixture(scope="module")
def engine(fresh_pg_url: Any) -> Iterator[Engine]:
    url = fresh_pg_url()
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        jobs = ("INSERT INTO jobs (id, org_id, capability, status, request, route, attempts, "
                "created_at, cancel_requested, attempt_floor) SELECT :prefix || n, 'org_plan', "
                "'planner', :status, '{}', '{}', :attempts, now(), false, 0 "
                "FROM generate_series(1, :rows) AS n")
        conn.execute(text(jobs), {"prefix": "job_done_", "status": "succeeded", "attempts": 1,
                                  "rows": 200})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE jobs"))
    with engine.begin() as conn:
        conn.execute(text(jobs), {"prefix": "job_new_", "status": "queued", "attempts": 0,
                                  "rows": QUEUED})
    yield engine
    engine.dispose()


def plan_of(engine: Engine, statement: Any, params: dict[str, Any]) -> str:
    """PostgreSQL's plan for ``statement`` with ``params``, as SQLAlchemy would send it."""
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, sql: str, parameters: Any, context: Any,
                executemany: bool) -> tuple[str, Any]:
        return "EXPLAIN " + sql, parameters

    def keep(conn: Any, cursor: Any, *args: Any) -> None:
        plans.extend(row[0] for row in cursor.fetchall())

    event.listen(engine, "before_cursor_execute", explain, retval=True)
    event.listen(engine, "after_cursor_execute", keep)
    try:
        with Session(engine) as session:
            session.connection().execute(statement, params)  # its rows are the plan's
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", explain)
        event.remove(engine, "after_cursor_execute", keep)
    assert plans, "no plan came back"
    return "\n".join(plans)


def test_claim_finds_jobs_by_primary_key(engine: Engine) -> None:
    now = utcnow()
    plan = plan_of(engine, runner._CLAIM, {
        "b_ids": [f"job_new_{n}" for n in range(1, 33)], "b_now": now, "b_worker": "w",
        "b_lease": now + timedelta(seconds=60)})
    assert "pk_jobs" in plan, plan
    assert "ix_jobs_status" not in plan, plan


@pytest.mark.parametrize("statement, params", [
    (runner._FINISH_JOB, {"b_id": "job_new_7", "b_claimed": 1, "b_status": "succeeded",
                          "b_result": None, "b_usage": None, "b_error": None,
                          "b_attempts": 1}),
    (runner._DROP_KEPT_ANSWER, {"b_job_id": "job_new_7", "b_number": 1}),
], ids=["finish", "drop-kept-answer"])
def test_finish_statements_find_the_job_by_primary_key(engine: Engine, statement: Any,
                                                       params: dict[str, Any]) -> None:
    plan = plan_of(engine, statement, {**params, "b_now": utcnow()})
    assert "ix_jobs_status" not in plan, plan
    assert "pk_jobs" in plan, plan
