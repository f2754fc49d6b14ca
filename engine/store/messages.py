"""Reading stored messages back: what `engine messages` and the replay need."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection

from engine.errors import ProcessingWarning
from engine.store import crypto
from engine.store.models import Message

MESSAGES = Message.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
LIST_COLUMNS = (
    "id",
    "channel",
    "control_id",
    "message_type",
    "status",
    "received_at",
    "patient_id",
    "error",
    "flags",
    "warnings",
    "replay_of",
)


@dataclass
class MessageFilter:
    channel: str | None = None
    status: str | None = None
    message_type: str | None = None
    control_id: str | None = None
    patient_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    with_warnings: bool = False  # only messages that kept a ProcessingWarning


def list_messages(engine: Engine, f: MessageFilter) -> list[dict[str, Any]]:
    cols = [MESSAGES.c[name] for name in LIST_COLUMNS]
    stmt = select(*cols).order_by(MESSAGES.c.id.desc()).limit(f.limit)
    conditions = {
        "channel": f.channel,
        "status": f.status,
        "message_type": f.message_type,
        "control_id": f.control_id,
        "patient_id": f.patient_id,
    }
    for name, value in conditions.items():
        if value:
            stmt = stmt.where(MESSAGES.c[name] == value)
    if f.with_warnings:
        stmt = stmt.where(MESSAGES.c.warnings != "")
    if f.since:
        stmt = stmt.where(MESSAGES.c.received_at >= f.since)
    if f.until:
        stmt = stmt.where(MESSAGES.c.received_at < f.until)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


def get_message(engine: Engine, message_id: int) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(MESSAGES).where(MESSAGES.c.id == message_id)).mappings().first()
    if row is None:
        return None
    found = dict(row)
    found["raw"] = crypto.open_value(found["raw"], crypto.RAW)  # the body as received, opened if sealed
    return found


def note_message(
    conn: Connection, message_id: int, *, flag: str = "", warnings: Sequence[ProcessingWarning] = ()
) -> None:
    """Add a flag and warnings to a message being stored, from a local destination that learns them
    only inside the transaction (an unscheduled MPPS: no worklist item matched)."""
    row = conn.execute(select(MESSAGES.c.flags, MESSAGES.c.warnings).where(MESSAGES.c.id == message_id)).first()
    if row is None:
        return
    flags = [f for f in (row[0] or "").split(",") if f]
    if flag and flag not in flags:
        flags.append(flag)
    kept = json.loads(row[1]) if row[1] else []
    kept += [w.as_dict() for w in warnings]
    conn.execute(
        update(MESSAGES)
        .where(MESSAGES.c.id == message_id)
        .values(flags=",".join(flags)[:200], warnings=json.dumps(kept) if kept else "")
    )
