"""Small portable SQL helpers for the two dialects we support.

Statements on hot paths are built once and executed on the session's connection with
parameters, which skips per-call statement construction and the ORM's bulk machinery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert


def checked_on_row(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    """Conditions a statement checks on the rows its key lookup found, never uses to find them.

    ``(...) IS TRUE`` filters exactly like the bare conditions, but no index can serve it, so
    PostgreSQL's planner stays on the primary key. Without it, a lookup by id that also
    checks ``status`` can be planned through a status index whenever the table's statistics
    are stale (a young table, a large batch that just arrived): every claim or finish then
    reads every queued or running job instead of one row.
    """
    return and_(*conditions).is_(true())


_INSERT_IGNORING: dict[tuple[str, str, tuple[str, ...]], Insert] = {}


def insert_ignoring_conflicts(
    session: Session, table: Table, values: dict[str, Any], conflict_columns: Sequence[str]
) -> bool:
    """Insert one row unless its unique key exists; True when a row was written."""
    stmt = _insert_ignoring(session.get_bind().dialect.name, table, tuple(conflict_columns))
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING.
    return session.connection().execute(stmt, values).first() is not None


def insert_ignoring_conflicts_many(
    session: Session, table: Table, rows: list[dict[str, Any]], conflict_columns: Sequence[str]
) -> None:
    """Insert rows whose unique key is not there yet, in one statement (many VALUES)."""
    stmt = _insert_ignoring(session.get_bind().dialect.name, table, tuple(conflict_columns))
    session.connection().execute(stmt, rows)


def _insert_ignoring(dialect: str, table: Table, conflict_columns: tuple[str, ...]) -> Insert:
    key = (dialect, table.name, conflict_columns)
    stmt = _INSERT_IGNORING.get(key)
    if stmt is None:
        if dialect == "postgresql":
            stmt = postgresql.insert(table).on_conflict_do_nothing(
                index_elements=list(conflict_columns)
            )
        elif dialect == "sqlite":
            stmt = sqlite.insert(table).on_conflict_do_nothing(
                index_elements=list(conflict_columns)
            )
        else:  # pragma: no cover - only the two dialects above are supported
            raise NotImplementedError(f"unsupported SQL dialect {dialect!r}")
        stmt = stmt.returning(*(table.c[name] for name in conflict_columns))
        _INSERT_IGNORING[key] = stmt
    return stmt
