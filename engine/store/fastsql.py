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

    def __init__(self, table: Table, dialect: Dialect, on_conflict: str = "") -> None:
        """`on_conflict`: an `ON CONFLICT ... DO NOTHING` clause; a row it skips returns no id."""
        self.columns = [c.name for c in table.columns if not c.primary_key]
        # scalar column defaults stand in for keys a caller leaves out
        self.defaults = {
            c.name: c.default.arg  # type: ignore[attr-defined]  # ScalarElementColumnDefault, checked by is_scalar
            for c in table.columns
            if c.default is not None and c.default.is_scalar
        }
        mark = marker(dialect)
        names = ", ".join(self.columns)
        conflict = f" {on_conflict}" if on_conflict else ""
        self.sql = (f"INSERT INTO {table.name} ({names}) VALUES ({', '.join([mark] * len(self.columns))})"
                    f"{conflict} RETURNING id")
        self.processors: list[Callable[[Any], Any] | None] = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self.columns
        ]

    def params(self, values: dict[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, proc in zip(self.columns, self.processors, strict=True):
            value = values[name] if name in values else self.defaults.get(name)
            out.append(proc(value) if proc is not None and value is not None else value)
        return tuple(out)

    def execute(self, conn: Connection, rows: Iterable[dict[str, Any]]) -> list[int]:
        cursor = _cursor(conn)
        try:
            ids = []
            for values in rows:
                cursor.execute(self.sql, self.params(values))
                ids.append(int(cursor.fetchone()[0]))
            return ids
        finally:
            cursor.close()

    def execute_one(self, conn: Connection, values: dict[str, Any]) -> int | None:
        """One row; None when the ON CONFLICT clause skipped it."""
        cursor = _cursor(conn)
        try:
            cursor.execute(self.sql, self.params(values))
            row = cursor.fetchone()
            return int(row[0]) if row is not None else None
        finally:
            cursor.close()


class RawSelect:
    """`SELECT <every column> FROM table WHERE a = ? AND b = ? ORDER BY id`, rows as dicts with
    the columns' own result processing (dates come back as datetimes, as through SQLAlchemy)."""

    def __init__(self, table: Table, dialect: Dialect, where: Sequence[str]) -> None:
        self.names = [c.name for c in table.columns]
        mark = marker(dialect)
        cond = " AND ".join(f"{name} = {mark}" for name in where)
        self.sql = f"SELECT {', '.join(self.names)} FROM {table.name} WHERE {cond} ORDER BY id"
        self.processors = [
            table.c[name].type.dialect_impl(dialect).result_processor(dialect, None) for name in self.names
        ]

    def rows(self, conn: Connection, params: Sequence[Any]) -> list[dict[str, Any]]:
        out = []
        for row in raw_select(conn, self.sql, params):
            out.append({
                name: (proc(value) if proc is not None and value is not None else value)
                for name, proc, value in zip(self.names, self.processors, row, strict=True)
            })
        return out


class Savepoint:
    """SAVEPOINT / RELEASE / ROLLBACK TO on the cursor: SQLAlchemy's nested transaction object
    cost a quarter of a worklist message's time in the writer."""

    def __init__(self, conn: Connection, name: str = "unit") -> None:
        self.cursor = _cursor(conn)
        self.name = name
        self.cursor.execute(f"SAVEPOINT {name}")

    def release(self) -> None:
        self.cursor.execute(f"RELEASE SAVEPOINT {self.name}")
        self.cursor.close()

    def rollback(self) -> None:
        self.cursor.execute(f"ROLLBACK TO SAVEPOINT {self.name}")
        self.cursor.execute(f"RELEASE SAVEPOINT {self.name}")
        self.cursor.close()


def raw_select(conn: Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    cursor = _cursor(conn)
    try:
        cursor.execute(sql, tuple(params))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def marker(dialect: Dialect) -> str:
    """The DBAPI's parameter placeholder."""
    return "?" if dialect.paramstyle == "qmark" else "%s"


def _cursor(conn: Connection) -> Any:
    """A DBAPI cursor inside the connection's transaction (begun here if SQLAlchemy has not yet:
    a raw statement must never run in autocommit)."""
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]  # open: in a transaction


_cache: dict[tuple[Any, ...], Any] = {}


def cached(kind: type, table: Table, dialect: Dialect, *args: Any) -> Any:
    """One statement object per (kind, table, dialect, shape), built on first use."""
    key = (kind, table.name, dialect.name, dialect.paramstyle, *args)
    stmt = _cache.get(key)
    if stmt is None:
        stmt = _cache[key] = kind(table, dialect, *args)
    return stmt
