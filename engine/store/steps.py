"""Performed procedure steps (MPPS instances): one row per SOP Instance UID, database-enforced.

A row keeps the PPS as the modality built it (N-CREATE, then each N-SET's changes merged in,
as DICOM JSON) with what the engine knew of each matched order at N-CREATE (the record is sealed
when ENGINE_KEY is set), its status, the study it belongs to, and the worklist items it was
matched to: none for an unscheduled step (IHE "unscheduled case"), which is kept and flagged.
Also here: matching a Scheduled Step Attributes item to its worklist row.

Functions take a Core `Connection` inside a transaction the caller owns: they never commit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, Text, UniqueConstraint, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel

from engine.store import crypto
from engine.store.models import utcnow
from engine.store.worklist import WorklistItem, load_dataset

__all__ = [
    "DATASET",
    "PerformedStep",
    "completed_instances",
    "get_step",
    "insert_step",
    "match_item",
    "update_step",
]

DATASET = b"performed_steps.dataset_json"  # associated data of the sealed column


class PerformedStep(SQLModel, table=True):
    __tablename__ = "performed_steps"
    __table_args__ = (UniqueConstraint("sop_instance_uid", name="uq_performed_steps_sop_instance"),)

    id: int | None = Field(default=None, primary_key=True)
    sop_instance_uid: str = Field(sa_type=String())  # no length: a modality's over-long UID still fits
    channel: str = Field(default="", max_length=100)
    status: str = Field(default="IN PROGRESS", max_length=16)
    study_instance_uid: str = Field(default="", sa_type=String(), index=True)
    accession_number: str = Field(default="", max_length=64)
    patient_id: str = Field(default="", max_length=200)
    calling_aet: str = Field(default="", max_length=16)
    worklist_items: str = Field(default="", max_length=200)  # matched worklist row ids ("1,2"); "": unscheduled
    discontinuation_reason: str = Field(default="", max_length=200)  # code^scheme^meaning
    instance_count: int = 0  # instances the Performed Series Sequence lists
    message_id: int | None = None  # the N-CREATE's stored message
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    dataset_json: str = Field(default="{}", sa_type=Text)


T = PerformedStep.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
W = WorklistItem.__table__  # type: ignore[attr-defined]  # (same)


def _dump(record: Mapping[str, Any]) -> str:
    return crypto.seal_text(json.dumps(record, ensure_ascii=False, separators=(",", ":")), DATASET)


def get_step(conn: Connection, sop_instance_uid: str, *, for_update: bool = False) -> dict[str, Any] | None:
    """The step with its `record` ({"pps": DICOM JSON, "orders": [...]}), or None.

    `for_update`: the row stays locked until the caller's commit (PostgreSQL), so two N-SETs of one
    step on two nodes are applied one after the other, the second seeing the first's status."""
    query = select(T).where(T.c.sop_instance_uid == sop_instance_uid)
    row = conn.execute(query.with_for_update() if for_update else query).mappings().first()
    if row is None:
        return None
    found = dict(row)
    found["record"] = json.loads(crypto.open_text(found["dataset_json"], DATASET))
    return found


def insert_step(conn: Connection, record: Mapping[str, Any], **columns: Any) -> int | None:
    """The new step's id, or None when a step with this SOP Instance UID exists already.

    The unique key decides a race: when another engine node inserts the same instance at the same
    moment, the database makes this insert wait for that one's commit and then skip, so the caller
    answers as it does for any existing instance instead of failing on a unique violation."""
    now = utcnow()
    values = {"created_at": now, "updated_at": now, **columns, "dataset_json": _dump(record)}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite  # the two stores the engine runs on
    stmt = (dialect.insert(T).values(**values)
            .on_conflict_do_nothing(index_elements=[T.c.sop_instance_uid]).returning(T.c.id))
    new_id = conn.execute(stmt).scalar()
    return int(new_id) if new_id is not None else None


def update_step(conn: Connection, step_id: int, record: Mapping[str, Any], **columns: Any) -> None:
    conn.execute(
        update(T).where(T.c.id == step_id).values(**columns, dataset_json=_dump(record), updated_at=utcnow())
    )


def completed_instances(conn: Connection, study_instance_uid: str) -> int | None:
    """How many instances the COMPLETED MPPS of this study listed (None: no COMPLETED MPPS), so the
    poll reports the study only when the PACS holds more than that (a series added later)."""
    row = conn.execute(
        select(func.count(T.c.id), func.coalesce(func.sum(T.c.instance_count), 0)).where(
            T.c.study_instance_uid == study_instance_uid, T.c.status == "COMPLETED"
        )
    ).first()
    return int(row[1]) if row is not None and row[0] else None


def match_item(
    conn: Connection,
    *,
    study_instance_uid: str = "",
    accession_number: str = "",
    requested_procedure_id: str = "",
    sps_id: str = "",
) -> dict[str, Any] | None:
    """The worklist row a Scheduled Step Attributes item names, or None (unscheduled).

    The SPS ID narrows within an order (accession or study); the most specific key set that finds
    exactly one row wins, so a study with two steps is matched by its SPS ID, and a modality that
    sends only the accession still finds a single-step order."""
    order = [c for c in (
        W.c.accession_number == accession_number if accession_number else None,
        W.c.study_instance_uid == study_instance_uid if study_instance_uid else None,
    ) if c is not None]
    if not order:
        return None
    narrowing = [W.c.sps_id == sps_id] if sps_id else []
    if requested_procedure_id:
        narrowing.append(W.c.requested_procedure_id == requested_procedure_id)
    tries = [and_(or_(*order), *narrowing)] if narrowing else []
    tries.append(or_(*order))
    for where in tries:
        rows = conn.execute(select(W).where(where).order_by(W.c.id).limit(2)).mappings().all()
        if len(rows) == 1:
            found = dict(rows[0])
            found["dataset"] = load_dataset(found["dataset_json"])
            return found
    return None
