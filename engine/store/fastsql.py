"""Statements for the writer's hot path, sent straight to the DBAPI cursor.

SQLAlchemy's per-statement work (building, cache keys, result wrapping) cost the writer about
three times what SQLite itself spends on a group commit. These few statements are written once
per dialect, with the column types' own bind processors so that what lands in the table is
exactly what SQLAlchemy would have written and reads back the same way. They run on the same
connection, inside the same transaction, as everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Dialect


class RawInsert:
    """`INSERT ... RETURNING id` for one table, one row per execute."""

    def __init__(self, table: Table, dialect: Dialect) -> None:
        self.columns = [c.name for c in table.columns if not c.primary_key]
        mark = _marker(dialect)
        names = ", ".join(self.columns)
        self.sql = f"INSERT INTO {table.name} ({names}) VALUES ({', '.join([mark] * len(self.columns))}) RETURNING id"
        self.processors: list[Callable[[Any], Any] | None] = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self.columns
        ]

    def params(self, values: dict[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, proc in zip(self.columns, self.processors, strict=True):
            value = values.get(name)
            out.append(proc(value) if proc is not None and value is not None else value)
        return tuple(out)

    def execute(self, conn: Connection, rows: Iterable[dict[str, Any]]) -> list[int]:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            ids = []
            for values in rows:
                cursor.execute(self.sql, self.params(values))
                ids.append(int(cursor.fetchone()[0]))
            return ids
        finally:
            cursor.close()


def raw_select(conn: Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, tuple(params))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def marker(dialect: Dialect) -> str:
    return _marker(dialect)


def _marker(dialect: Dialect) -> str:
    return "?" if dialect.paramstyle == "qmark" else "%s"
