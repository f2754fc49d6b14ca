"""Opening the store: SQLite (WAL, fsync on commit) by default, PostgreSQL by URL.

Durable means on disk: SQLite runs with `synchronous=FULL`, PostgreSQL with
`synchronous_commit=on`. SQLite write transactions start with `BEGIN IMMEDIATE` so two writers
queue on the lock instead of failing half-way through with "database is locked".
Readers that must not queue behind the writer (worklist C-FIND) use `make_read_engine`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from engine.store import files

log = logging.getLogger(__name__)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_url_for(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def sqlite_file(url: str) -> Path | None:
    """The store file of a SQLite URL (None for an in-memory one)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _private_store(path: Path) -> None:
    """The store file and its folder created 0700/0600 before SQLite opens them (SQLite gives
    the -wal and -shm files the database file's mode; they are chmod-ed on connect as well)."""
    files.private_dir(path.parent)
    files.private_file(path)


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    if is_sqlite(url):
        store = sqlite_file(url)
        if store is not None:
            _private_store(store)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA cache_size=-16384")  # 16 MiB of pages per connection, then flat
            cur.close()
            if store is not None:
                for suffix in ("-wal", "-shm"):
                    files.restrict(store.with_name(store.name + suffix))

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=8, pool_pre_ping=True, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_pg_connect(dbapi_conn, _record) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET synchronous_commit = on")
        dbapi_conn.commit()

    return engine


_read_engines: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_read_only: weakref.WeakSet[Engine] = weakref.WeakSet()
_read_lock = threading.Lock()


def make_read_engine(db: Engine) -> Engine:
    """The engine to run plain SELECTs on: `db` itself for PostgreSQL and in-memory SQLite, and for a
    SQLite file one read-only sibling per store engine (made once, then reused).

    The store's SQLite engine begins every transaction with BEGIN IMMEDIATE (the write lock), which
    would queue readers behind the message writer; in WAL mode a plain SELECT reads a snapshot
    without any lock. `PRAGMA query_only` makes the sibling refuse writes.
    """
    url = db.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return db
    with _read_lock:
        if db in _read_only:
            return db
        reader = _read_engines.get(db)
        if reader is None:
            reader = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)

            @event.listens_for(reader, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA query_only=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            _read_engines[db] = reader
            _read_only.add(reader)
        return reader


def init_db(engine: Engine) -> None:
    """Create every table the engine uses (idempotent)."""
    from sqlalchemy import inspect

    from engine.store import schema  # noqa: F401  (imports every table module)

    with _schema_lock(engine):  # two nodes starting together on an empty store would both CREATE
        tables = set(inspect(engine).get_table_names())
        SQLModel.metadata.create_all(engine)
        _add_missing_columns(engine)
        _backfill_keys(engine, "dedupe_keys" in tables or "messages" not in tables)
    from engine.store import crypto

    crypto.check_store(engine)  # a wrong ENGINE_KEY is refused here, at start


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, one process at a time creates or migrates the schema (a session advisory lock
    on the current schema, held on a connection of its own)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    key = f"{0x454E48}, hashtext(current_schema())"  # ("ENH"; the store lock uses "ENG")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
        conn.commit()
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
            conn.commit()


# columns added since a store may have been created: (table, column, SQL type and default)
ADDED_COLUMNS = (
    ("messages", "warnings", "TEXT NOT NULL DEFAULT ''"),
    ("deliveries", "claimed_by", "VARCHAR(200) NOT NULL DEFAULT ''"),
    ("deliveries", "lease_until", "TIMESTAMP WITH TIME ZONE"),  # SQLite takes the name, stores ISO text
    ("deliveries", "claims", "INTEGER NOT NULL DEFAULT 0"),
    ("deliveries", "resent", "TEXT NOT NULL DEFAULT ''"),
    ("worklist_items", "order_key", "VARCHAR NOT NULL DEFAULT ''"),
    ("worklist_items", "step_key", "VARCHAR NOT NULL DEFAULT ''"),
)
# indexes added since (create_all makes a table's indexes only with the table)
ADDED_INDEXES = (("worklist_items", "ux_worklist_order_step"),)


def _add_missing_columns(engine: Engine) -> None:
    """A store made by an earlier version gets the columns and indexes added since (create_all
    adds none), and its dedupe keys from the messages it holds."""
    from sqlalchemy import inspect

    inspector = inspect(engine)
    for table, column, ddl in ADDED_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
    for table, name in ADDED_INDEXES:
        if name not in {i["name"] for i in inspector.get_indexes(table)}:
            (index,) = [i for i in SQLModel.metadata.tables[table].indexes if i.name == name]
            index.create(engine, checkfirst=True)


def _backfill_keys(engine: Engine, had_keys: bool) -> None:
    if had_keys:
        return
    from engine.store import dedupe

    with engine.begin() as conn:
        count = dedupe.backfill(conn)
    if count:
        log.info("dedupe keys made for %d stored messages", count)
