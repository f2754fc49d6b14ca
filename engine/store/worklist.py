"""The worklist table: one row per scheduled procedure step, queried by the MWL SCP.

Each row keeps the full item (the mapping's contract dict, as JSON) plus the keys modalities
match on, copied into indexed columns so a C-FIND becomes an indexed query whose cost follows the
number of answers, not the size of the table. The DICOM matcher decides on the JSON; the columns
only narrow. Key columns compare bytewise (collation "C" on PostgreSQL, BINARY on SQLite) so that
prefix ranges ("SMITH*" -> >= 'SMITH' AND < 'SMITH\\U0010FFFF') never drop a true match.

Functions take a Core `Connection` inside a transaction the caller owns: they never commit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import DateTime, Index, String, Text, and_, delete, insert, or_, select, update
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel

from engine.store import crypto
from engine.store.fastsql import RawInsert, RawSelect, cached
from engine.store.models import utcnow

__all__ = [
    "OPEN_STATUSES",
    "DuplicateItem",
    "SPS_KEYS",
    "SPS_SEQ",
    "StepStatus",
    "WorklistItem",
    "columns_for",
    "find_items",
    "identity_for",
    "find_item",
    "insert_item",
    "insert_many",
    "load_dataset",
    "merge_patient",
    "normalize_da",
    "normalize_tm",
    "order_key_for",
    "pn_key",
    "purge",
    "set_status",
    "update_item",
    "update_patient",
]


class StepStatus(StrEnum):
    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    CANCELLED = "CANCELLED"
    DISCONTINUED = "DISCONTINUED"
    COMPLETED = "COMPLETED"


OPEN_STATUSES = (StepStatus.SCHEDULED.value, StepStatus.IN_PROGRESS.value)

SPS_SEQ = "ScheduledProcedureStepSequence"
# keys that live inside the SPS item (some modalities send them at top level)
SPS_KEYS = frozenset(
    {
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "ScheduledProcedureStepEndDate",
        "ScheduledProcedureStepEndTime",
        "Modality",
        "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepDescription",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepLocation",
        "ScheduledStationName",
        "ScheduledProcedureStepStatus",
        "PreMedication",
        "RequestedContrastAgent",
        "CommentsOnTheScheduledProcedureStep",
    }
)
DEMOGRAPHIC_KEYS = ("PatientName", "PatientBirthDate", "PatientSex")


def _key() -> Any:
    """A string column compared bytewise on every backend (prefix ranges rely on it).

    No length limit: RIS values often exceed the DICOM VR maxima and must not fail the insert.
    """
    return String().with_variant(String(collation="C"), "postgresql")


# rows an order identity and an SPS ID name are unique; a step without SPS ID is not (its order may
# hold several), nor is a row stored before the key columns existed
_KEYED = "order_key != '' AND step_key != ''"
ORDER_STEP_CONFLICT = f"ON CONFLICT (order_key, step_key) WHERE {_KEYED} DO NOTHING"


class DuplicateItem(Exception):
    """The order's step exists already (stored meanwhile by another engine process): update it instead."""


class WorklistItem(SQLModel, table=True):
    __tablename__ = "worklist_items"
    __table_args__ = (
        # IHE RAD-5 broad query: SPS date (+time) with station and/or modality
        Index("ix_worklist_station_start", "station_aet", "sps_start"),
        Index("ix_worklist_modality_start", "modality", "sps_start"),
        # patient query
        Index("ix_worklist_patient", "patient_id", "issuer"),
        # order identity (lifecycle) and purge
        Index("ix_worklist_order", "filler_order", "placer_order"),
        # one row per step of an order, whichever engine process stores it (see ORDER_STEP_CONFLICT)
        Index("ux_worklist_order_step", "order_key", "step_key", unique=True,
              sqlite_where=sql_text(_KEYED), postgresql_where=sql_text(_KEYED)),
        # purge (no index leads with status: the planner would pick it for every C-FIND)
        Index("ix_worklist_updated", "updated_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(default="", max_length=100)
    patient_id: str = Field(default="", sa_type=_key())
    issuer: str = Field(default="", sa_type=_key())
    patient_name_key: str = Field(default="", sa_type=_key(), index=True)
    accession_number: str = Field(default="", sa_type=_key(), index=True)
    requested_procedure_id: str = Field(default="", sa_type=_key(), index=True)
    study_instance_uid: str = Field(default="", sa_type=_key(), index=True)
    sps_id: str = Field(default="", sa_type=_key(), index=True)
    sps_start_date: str = Field(default="", sa_type=_key())
    sps_start_time: str = Field(default="", sa_type=_key())
    sps_start: str = Field(default="", sa_type=_key(), index=True)  # "YYYYMMDDHHMMSS" (sortable)
    modality: str = Field(default="", sa_type=_key())
    station_aet: str = Field(default="", sa_type=_key())
    status: str = Field(default=StepStatus.SCHEDULED.value, max_length=16)
    placer_order: str = Field(default="", sa_type=_key())
    filler_order: str = Field(default="", sa_type=_key())
    # the order's identity as the worklist destination finds it (order_key_for) and the step's SPS ID
    order_key: str = Field(default="", sa_type=_key())
    step_key: str = Field(default="", sa_type=_key())
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    dataset_json: str = Field(default="{}", sa_type=Text)


T = WorklistItem.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes


def normalize_da(value: str) -> str:
    """DA as 8 digits (tolerates the old 'YYYY.MM.DD' form)."""
    return value.strip().replace(".", "")


def normalize_tm(value: str) -> str:
    """TM as HHMMSS[.FFFFFF], missing minutes/seconds as zeros (tolerates 'HH:MM:SS')."""
    v = value.strip().replace(":", "")
    if not v:
        return ""
    whole, _, frac = v.partition(".")
    whole = whole.ljust(6, "0")
    return f"{whole}.{frac}" if frac else whole


def pn_key(name: str) -> str:
    """Uppercased PN without trailing empty components: the case-insensitive matching key."""
    groups = [g.rstrip("^ ") for g in name.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups).upper()


# an index entry must stay well inside PostgreSQL's btree row limit (about 2,700 bytes)
KEY_MAX = 512


def _s(value: Any) -> str:
    if value is None:
        return ""
    text = str(value).strip()
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text[:KEY_MAX]


def order_key_for(filler_order: str, placer_order: str, accession_number: str) -> str:
    """An order's identity, by the rule `find_items` finds it: the filler order number when there is
    one, else the placer order number with the accession number."""
    if filler_order:
        return f"F:{filler_order}"[:KEY_MAX]
    if placer_order:
        return f"P:{placer_order}\x1f{accession_number}"[:KEY_MAX]
    return ""


def columns_for(dataset: Mapping[str, Any]) -> dict[str, str]:
    """The indexed columns of one item (its dataset holds one SPS item)."""
    seq = dataset.get(SPS_SEQ) or [{}]
    sps = seq[0] if seq else {}
    date = normalize_da(_s(sps.get("ScheduledProcedureStepStartDate")))
    time = normalize_tm(_s(sps.get("ScheduledProcedureStepStartTime")))
    filler = _s(dataset.get("FillerOrderNumberImagingServiceRequest"))
    placer = _s(dataset.get("PlacerOrderNumberImagingServiceRequest"))
    return {
        "patient_id": _s(dataset.get("PatientID")),
        "issuer": _s(dataset.get("IssuerOfPatientID")),
        "patient_name_key": pn_key(_s(dataset.get("PatientName"))),
        "accession_number": _s(dataset.get("AccessionNumber")),
        "requested_procedure_id": _s(dataset.get("RequestedProcedureID")),
        "study_instance_uid": _s(dataset.get("StudyInstanceUID")),
        "sps_id": _s(sps.get("ScheduledProcedureStepID")),
        "sps_start_date": date,
        "sps_start_time": time,
        "sps_start": (date + time[:6]) if date else "",
        "modality": _s(sps.get("Modality")),
        "station_aet": _s(sps.get("ScheduledStationAETitle")),
        "placer_order": placer,
        "filler_order": filler,
    }


def identity_for(dataset: Mapping[str, Any]) -> dict[str, str]:
    """The order_key and step_key columns of an item the worklist destination manages: its order
    identity (order_key_for) and its SPS ID. Rows stored without them (imports, tests) are not
    held to the one-row-per-step rule."""
    seq = dataset.get(SPS_SEQ) or [{}]
    sps = seq[0] if seq else {}
    return {
        "order_key": order_key_for(_s(dataset.get("FillerOrderNumberImagingServiceRequest")),
                                   _s(dataset.get("PlacerOrderNumberImagingServiceRequest")),
                                   _s(dataset.get("AccessionNumber"))),
        "step_key": _s(sps.get("ScheduledProcedureStepID")),
    }


def _dump(dataset: Mapping[str, Any]) -> str:
    """The stored form of a dataset: JSON, sealed when ENGINE_KEY is set."""
    return crypto.seal_text(json.dumps(dataset, ensure_ascii=False, separators=(",", ":")), crypto.DATASET)


def load_dataset(stored: str) -> Any:
    """A `dataset_json` column value as the item dict (opened if sealed): for every reader."""
    return json.loads(crypto.open_text(stored, crypto.DATASET))


def find_items(
    conn: Connection,
    *,
    filler_order: str = "",
    placer_order: str = "",
    accession_number: str = "",
    sps_id: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of one order (filler number if given, else placer number + accession), as dicts.

    Each dict holds the row's columns plus `dataset` (the parsed JSON item).
    """
    # on the hot path of every order: statements built once, sent to the driver
    if filler_order:
        where, params = ["filler_order"], [filler_order]
    elif placer_order:
        where, params = ["placer_order"], [placer_order]
        if accession_number:
            where.append("accession_number")
            params.append(accession_number)
    else:
        return []
    if sps_id is not None:
        where.append("sps_id")
        params.append(sps_id)
    rows = cached(RawSelect, T, conn.dialect, tuple(where)).rows(conn, params)
    for row in rows:
        row["dataset_json"] = crypto.open_text(row["dataset_json"], crypto.DATASET)
        row["dataset"] = json.loads(row["dataset_json"])
    return rows


def find_item(
    conn: Connection,
    *,
    filler_order: str = "",
    placer_order: str = "",
    accession_number: str = "",
    sps_id: str | None = None,
) -> dict[str, Any] | None:
    """The first row of an order (see `find_items`), or None."""
    rows = find_items(
        conn, filler_order=filler_order, placer_order=placer_order, accession_number=accession_number, sps_id=sps_id
    )
    return rows[0] if rows else None


def insert_item(
    conn: Connection,
    dataset: Mapping[str, Any],
    *,
    channel: str = "",
    status: str = StepStatus.SCHEDULED.value,
    now: datetime | None = None,
    keyed: bool = False,
) -> int:
    """Insert one SPS item; returns its id. `keyed` (the worklist destination): the row carries its
    order identity and SPS ID (identity_for), and DuplicateItem says the order already holds that
    step: another engine process stored the same order meanwhile."""
    now = now or utcnow()
    values = columns_for(dataset) | (identity_for(dataset) if keyed else {}) | {
        "channel": channel,
        "status": status,
        "created_at": now,
        "updated_at": now,
        "dataset_json": _dump(dataset),
    }
    item_id = cached(RawInsert, T, conn.dialect, ORDER_STEP_CONFLICT).execute_one(conn, values)
    if item_id is None:
        raise DuplicateItem(values["order_key"])
    return item_id


def insert_many(
    conn: Connection, datasets: Iterable[Mapping[str, Any]], *, channel: str = "", now: datetime | None = None
) -> int:
    """Bulk insert of SCHEDULED items (imports, benchmarks); returns the count."""
    now = now or utcnow()
    rows = [
        columns_for(ds)
        | {
            "channel": channel,
            "status": StepStatus.SCHEDULED.value,
            "created_at": now,
            "updated_at": now,
            "dataset_json": _dump(ds),
        }
        for ds in datasets
    ]
    if rows:
        conn.execute(insert(T), rows)
    return len(rows)


def update_item(
    conn: Connection,
    item_id: int,
    dataset: Mapping[str, Any],
    *,
    status: str | None = None,
    now: datetime | None = None,
    keyed: bool = False,
) -> None:
    """Replace an item's dataset (and its key columns; with `keyed` its identity, see insert_item);
    optionally its status."""
    values: dict[str, Any] = columns_for(dataset) | (identity_for(dataset) if keyed else {}) | {
        "dataset_json": _dump(dataset), "updated_at": now or utcnow()}
    if status is not None:
        values["status"] = status
    conn.execute(update(T).where(T.c.id == item_id).values(**values))


def set_status(conn: Connection, item_id: int, status: str, *, now: datetime | None = None) -> None:
    """Change a step's status; the dataset's SPS status follows so answers agree with the column."""
    row = conn.execute(select(T.c.dataset_json).where(T.c.id == item_id)).first()
    if row is None:
        return
    dataset = load_dataset(row[0])
    for sps in dataset.get(SPS_SEQ) or []:
        if isinstance(sps, dict) and "ScheduledProcedureStepStatus" in sps:
            sps["ScheduledProcedureStepStatus"] = status
    conn.execute(
        update(T)
        .where(T.c.id == item_id)
        .values(status=status, dataset_json=_dump(dataset), updated_at=now or utcnow())
    )


def _patient_where(patient_id: str, issuer: str) -> Any:
    where = [T.c.patient_id == patient_id, T.c.status.in_(OPEN_STATUSES)]
    if issuer:
        # an item stored without issuer belongs to the same patient (single-issuer sites)
        where.append(or_(T.c.issuer == issuer, T.c.issuer == ""))
    return and_(*where)


def _rewrite_open_items(conn: Connection, where: Any, changes: Mapping[str, Any], now: datetime | None) -> int:
    rows = conn.execute(select(T.c.id, T.c.dataset_json).where(where)).all()
    for item_id, text in rows:
        dataset = load_dataset(text)
        for key, value in changes.items():
            if value is None:
                continue
            dataset[key] = value
        update_item(conn, item_id, dataset, now=now)
    return len(rows)


def update_patient(
    conn: Connection,
    patient_id: str,
    issuer: str,
    demographics: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> int:
    """Copy new demographics (name, birth date, sex) into the patient's open items; returns the count.

    Keys absent from `demographics` are kept; a key given as "" clears the stored value.
    """
    changes = {k: demographics[k] for k in DEMOGRAPHIC_KEYS if k in demographics}
    return _rewrite_open_items(conn, _patient_where(patient_id, issuer), changes, now)


def merge_patient(
    conn: Connection,
    prior_id: str,
    prior_issuer: str,
    new_id: str,
    new_issuer: str,
    demographics: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> int:
    """Move the prior patient's open items to the surviving id (A40); returns the count."""
    changes: dict[str, Any] = {k: demographics[k] for k in DEMOGRAPHIC_KEYS if k in demographics}
    changes["PatientID"] = new_id
    if new_issuer or prior_issuer:
        changes["IssuerOfPatientID"] = new_issuer
    return _rewrite_open_items(conn, _patient_where(prior_id, prior_issuer), changes, now)


def purge(conn: Connection, now: datetime, retention: timedelta, idle: timedelta) -> int:
    """Delete finished items older than `retention` and SCHEDULED items whose SPS date is older than `idle`."""
    finished = conn.execute(
        delete(T).where(T.c.status.not_in(OPEN_STATUSES), T.c.updated_at < now - retention)
    ).rowcount
    cutoff = (now - idle).strftime("%Y%m%d")
    stale = conn.execute(
        delete(T).where(
            T.c.status == StepStatus.SCHEDULED.value,
            T.c.sps_start_date != "",
            T.c.sps_start_date < cutoff,
        )
    ).rowcount
    return int(finished or 0) + int(stale or 0)
