"""Where each polling source stands: one row per (channel, resource type).

The FHIR poller keeps its `_lastUpdated` watermark here (so a restart asks only for what changed
since), and what its last run did, which `engine messages` and /metrics show.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel

from engine.store.models import utcnow

__all__ = ["POLL_STATE", "PollState", "load_states", "record_run"]


class PollState(SQLModel, table=True):
    __tablename__ = "poll_state"

    channel: str = Field(primary_key=True, max_length=100)
    resource_type: str = Field(primary_key=True, max_length=60)
    since: str = Field(default="", max_length=40)  # the server's time of the last complete run (_lastUpdated=ge)
    last_run_at: datetime | None = None
    last_ok_at: datetime | None = None
    runs: int = 0
    fetched: int = 0  # resources fetched by the last run
    stored: int = 0  # of them, new units (not duplicates)
    pages: int = 0
    last_error: str = Field(default="", max_length=400)  # a kind (HTTP status, exception class), never content


POLL_STATE = PollState.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ at class creation


def load_states(engine: Engine, channel: str | None = None) -> list[dict[str, Any]]:
    stmt = select(POLL_STATE).order_by(POLL_STATE.c.channel, POLL_STATE.c.resource_type)
    if channel:
        stmt = stmt.where(POLL_STATE.c.channel == channel)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


def record_run(
    engine: Engine,
    channel: str,
    resource_type: str,
    *,
    since: str | None,
    fetched: int,
    stored: int,
    pages: int,
    error: str = "",
) -> None:
    """One run's result; `since` moves only when the run completed (None keeps the old one)."""
    now = utcnow()
    values: dict[str, Any] = {"last_run_at": now, "fetched": fetched, "stored": stored, "pages": pages,
                              "last_error": error[:400]}
    if not error:
        values["last_ok_at"] = now
    if since is not None:
        values["since"] = since
    with engine.begin() as conn:
        _ensure(conn, channel, resource_type)
        conn.execute(
            update(POLL_STATE)
            .where(POLL_STATE.c.channel == channel, POLL_STATE.c.resource_type == resource_type)
            .values(runs=POLL_STATE.c.runs + 1, **values)
        )


def _ensure(conn: Connection, channel: str, resource_type: str) -> None:
    found = conn.execute(
        select(POLL_STATE.c.channel).where(POLL_STATE.c.channel == channel,
                                           POLL_STATE.c.resource_type == resource_type)
    ).first()
    if found is None:
        conn.execute(POLL_STATE.insert().values(channel=channel, resource_type=resource_type, since="", runs=0,
                                                fetched=0, stored=0, pages=0, last_error=""))
