"""Engine nodes on one store: who runs (a heartbeat row each), who leads, and who may start at all.

- `StoreLock` decides whether this process may use the store. SQLite: an exclusive lock on a file
  beside the database (one process, always). PostgreSQL: a session advisory lock for the current
  schema, exclusive for a process outside cluster mode and shared in cluster mode, so a lone
  process refuses a second one and cluster nodes refuse a lone one. The lock lives as long as its
  connection: a killed process's lock goes with its socket.
- `engine_nodes` holds one row per running node (name, host, pid, listeners, started, heartbeat).
- `engine_leases` holds named leases (the scheduler's leader): a row moves to another holder only
  once its expiry passed, so a dead leader is replaced within one lease.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Column, Engine, String, Text, case, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

from engine.store.models import utcnow

__all__ = ["EngineNode", "Lease", "NodeInUse", "StoreInUse", "StoreLock", "acquire_lease", "forget_others",
           "heartbeat", "leave", "list_nodes", "lease_holder", "register", "release_lease", "set_listeners"]

LEADER = "scheduler"  # the lease whose holder runs the scheduled jobs
# advisory lock class id ("ENG"); the object id is a hash of the schema, so stores in other schemas
# of one database do not collide
_LOCK_CLASS = 0x454E47


class EngineNode(SQLModel, table=True):
    __tablename__ = "engine_nodes"

    name: str = Field(sa_column=Column(String(200), primary_key=True))
    host: str = Field(default="", max_length=200)
    pid: int = 0
    cluster: bool = False
    listeners: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))  # JSON list
    started_at: datetime
    heartbeat_at: datetime


class Lease(SQLModel, table=True):
    __tablename__ = "engine_leases"

    name: str = Field(sa_column=Column(String(100), primary_key=True))
    holder: str = Field(default="", max_length=200)
    acquired_at: datetime
    expires_at: datetime


NODES = EngineNode.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
LEASES = Lease.__table__  # type: ignore[attr-defined]  # (same)


class StoreInUse(Exception):
    """Another engine process uses the store in a way this one may not join."""


class NodeInUse(Exception):
    """A live node already runs under this node name."""


class StoreLock:
    """Held for the process's lifetime; `acquire` raises StoreInUse with what to do about it."""

    def __init__(self, db: Engine, *, shared: bool) -> None:
        self.db = db
        self.shared = shared
        self._file: IO[bytes] | None = None
        self._conn: Connection | None = None
        self._engine: Engine = db

    def acquire(self) -> None:
        if self.db.dialect.name == "sqlite":
            self._lock_file()
        elif self.db.dialect.name == "postgresql":
            self._lock_advisory()

    def _lock_file(self) -> None:
        import fcntl

        database = self.db.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return
        path = Path(database).with_name(Path(database).name + ".lock")
        fh = open(path, "ab")  # noqa: SIM115 - held open for the process's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise StoreInUse(
                f"another engine process is using the SQLite store {database} (it holds {path.name}); "
                "a SQLite store serves one process: stop the other one, or use PostgreSQL "
                "(ENGINE_STORAGE_URL) with ENGINE_CLUSTER=true on every node"
            ) from None
        self._file = fh

    def _lock_advisory(self) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        # a connection of its own, outside the pool: closing it ends the session, and the lock with it
        self._engine = create_engine(self.db.url, poolclass=NullPool, hide_parameters=True)
        conn = self._engine.connect()
        fn = "pg_try_advisory_lock_shared" if self.shared else "pg_try_advisory_lock"
        got = conn.exec_driver_sql(f"SELECT {fn}({_LOCK_CLASS}, hashtext(current_schema()))").scalar()
        conn.commit()  # a session lock outlives the transaction; the connection must not idle in one
        if not got:
            conn.close()
            self._engine.dispose()
            if self.shared:
                raise StoreInUse(
                    "an engine process outside cluster mode is using this PostgreSQL store; stop it, "
                    "or start every process with ENGINE_CLUSTER=true"
                )
            raise StoreInUse(
                "another engine process is using this PostgreSQL store; several processes on one store "
                "need cluster mode: set ENGINE_CLUSTER=true (and a distinct ENGINE_NODE_NAME) on every one"
            )
        self._conn = conn

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None
        if self._conn is not None:
            try:
                self._conn.close()  # not pooled: the session ends, and the lock with it
            finally:
                self._conn = None
                self._engine.dispose()


@dataclass
class NodeRow:
    name: str
    host: str
    pid: int
    cluster: bool
    listeners: list[str]
    started_at: datetime
    heartbeat_at: datetime


def register(db: Engine, name: str, *, host: str, pid: int, cluster: bool, stale_after: timedelta) -> None:
    """This process's node row; NodeInUse when a node of that name beat within `stale_after`."""
    now = utcnow()
    with db.begin() as conn:
        row = conn.execute(select(NODES.c.heartbeat_at, NODES.c.pid, NODES.c.host).where(NODES.c.name == name)).first()
        if row is not None and _aware(row[0]) > now - stale_after and not (row[2] == host and not _alive(row[1])):
            raise NodeInUse(
                f"node name {name!r} is in use by a live engine process (pid {row[1]} on {row[2]}); "
                "give every node its own ENGINE_NODE_NAME"
            )
        conn.execute(delete(NODES).where(NODES.c.name == name))
        conn.execute(insert(NODES).values(name=name, host=host, pid=pid, cluster=cluster, listeners="[]",
                                          started_at=now, heartbeat_at=now))


def forget_others(db: Engine, name: str) -> int:
    """Remove every other node's row: for the store's only process (they are dead ones')."""
    with db.begin() as conn:
        return int(conn.execute(delete(NODES).where(NODES.c.name != name)).rowcount or 0)


def set_listeners(db: Engine, name: str, listeners: list[str]) -> None:
    with db.begin() as conn:
        conn.execute(update(NODES).where(NODES.c.name == name).values(listeners=json.dumps(listeners)))


def heartbeat(db: Engine, name: str) -> None:
    with db.begin() as conn:
        conn.execute(update(NODES).where(NODES.c.name == name).values(heartbeat_at=utcnow()))


def leave(db: Engine, name: str) -> None:
    with db.begin() as conn:
        conn.execute(delete(NODES).where(NODES.c.name == name))
        conn.execute(update(LEASES).where(LEASES.c.holder == name).values(expires_at=utcnow()))


def list_nodes(db: Engine) -> list[NodeRow]:
    with db.connect() as conn:
        rows = conn.execute(select(NODES).order_by(NODES.c.name)).mappings().all()
    found = []
    for r in rows:
        try:
            listeners = [str(x) for x in json.loads(r["listeners"] or "[]")]
        except ValueError:
            listeners = []
        found.append(NodeRow(r["name"], r["host"], int(r["pid"]), bool(r["cluster"]), listeners,
                             _aware(r["started_at"]), _aware(r["heartbeat_at"])))
    return found


def acquire_lease(db: Engine, name: str, holder: str, duration: timedelta) -> bool:
    """Take or keep the lease `name` for `duration`; True when `holder` holds it now."""
    now = utcnow()
    with db.begin() as conn:
        taken = conn.execute(
            update(LEASES)
            .where(LEASES.c.name == name, (LEASES.c.holder == holder) | (LEASES.c.expires_at < now))
            .values(holder=holder, expires_at=now + duration,
                    acquired_at=case((LEASES.c.holder == holder, LEASES.c.acquired_at), else_=now))
        ).rowcount
        if taken:
            return True
        if conn.execute(select(LEASES.c.name).where(LEASES.c.name == name)).first() is not None:
            return False
    try:
        with db.begin() as conn:
            conn.execute(insert(LEASES).values(name=name, holder=holder, acquired_at=now, expires_at=now + duration))
    except IntegrityError:  # another node made the row first: it holds the lease
        return False
    return True


def release_lease(db: Engine, name: str, holder: str) -> None:
    with db.begin() as conn:
        conn.execute(update(LEASES).where(LEASES.c.name == name, LEASES.c.holder == holder)
                     .values(expires_at=utcnow()))


def lease_holder(db: Engine, name: str) -> tuple[str, datetime] | None:
    """(holder, expiry) of a lease that has not expired, else None."""
    with db.connect() as conn:
        row = conn.execute(select(LEASES.c.holder, LEASES.c.expires_at).where(LEASES.c.name == name)).first()
    if row is None or _aware(row[1]) <= utcnow():
        return None
    return str(row[0]), _aware(row[1])


def _alive(pid: int) -> bool:
    """Whether a process of this host still runs under `pid` (a node killed and started again at once
    need not wait for its old heartbeat to lapse)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _aware(value: Any) -> datetime:
    """SQLite gives stored times back without their zone (they are UTC)."""
    from datetime import UTC

    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
