"""Small portable SQL helpers for the two dialects we support."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert


def insert_ignoring_conflicts(
    session: Session, table: Table, values: dict[str, Any], conflict_columns: Sequence[str]
) -> bool:
    """Insert one row unless its unique key exists; True when a row was written."""
    dialect = session.get_bind().dialect.name
    stmt: Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing(
            index_elements=list(conflict_columns)
        )
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing(
            index_elements=list(conflict_columns)
        )
    else:  # pragma: no cover - only the two dialects above are supported
        raise NotImplementedError(f"unsupported SQL dialect {dialect!r}")
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING.
    stmt = stmt.returning(*(table.c[name] for name in conflict_columns))
    return session.execute(stmt).first() is not None
