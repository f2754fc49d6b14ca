"""Medication reconciliation tables: sources per patient, their versions, and records per patient.

- `medrec_sources`: the current version of each medication resource, unique per channel +
  resource type + id (the database enforces it, so two writers can never hold two rows for one
  resource); a resend that changes nothing writes nothing.
- `medrec_source_versions`: every version as it arrived (received time), so the list can be
  rebuilt as it was on another day (`as-of`).
- `medrec_records`: the reconciled records of each patient as computed in the transaction of the
  unit that last touched the patient, with the day they were computed for (the window moves
  with the calendar: a reader recomputes a list computed on another day).

The stored forms are JSON, sealed like the worklist datasets when ENGINE_KEY is set; patient key,
resource type and id stay clear for the indexes. Functions take a Core `Connection` inside a
transaction the caller owns: they never commit. The values are plain dicts: this module knows
nothing of FHIR or of the rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pydantic_core
from sqlalchemy import Index, Text, UniqueConstraint
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel

from engine.store import crypto
from engine.store.fastsql import _cursor, marker

__all__ = [
    "RECORD_DATA",
    "SOURCE_DATA",
    "VERSION_DATA",
    "MedrecRecord",
    "MedrecSource",
    "MedrecSourceVersion",
    "Saved",
    "SourceRow",
    "load_records",
    "load_sources",
    "load_sources_as_of",
    "patients_of",
    "replace_records",
    "save_sources",
]

SOURCE_DATA = b"medrec_sources.data"
VERSION_DATA = b"medrec_source_versions.data"
RECORD_DATA = b"medrec_records.data"


class MedrecSource(SQLModel, table=True):
    __tablename__ = "medrec_sources"
    __table_args__ = (
        UniqueConstraint("channel", "resource_type", "resource_id", name="uq_medrec_sources_resource"),
        Index("ix_medrec_sources_patient", "channel", "patient_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=100)
    patient_key: str = Field(sa_type=Text)
    resource_type: str = Field(max_length=40)
    resource_id: str = Field(sa_type=Text)
    status: str = Field(default="", max_length=40)
    message_id: int | None = None
    updated_at: str = Field(default="", max_length=40)  # ISO 8601 UTC: compares as text on every backend
    version_time: str = Field(default="", max_length=40)  # the sender's last change (meta.lastUpdated), UTC
    data: str = Field(sa_type=Text)


class MedrecSourceVersion(SQLModel, table=True):
    __tablename__ = "medrec_source_versions"
    __table_args__ = (Index("ix_medrec_versions_patient", "channel", "patient_key", "received_at"),)

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=100)
    patient_key: str = Field(sa_type=Text)
    resource_type: str = Field(max_length=40)
    resource_id: str = Field(sa_type=Text)
    message_id: int | None = None
    received_at: str = Field(max_length=40)
    data: str = Field(sa_type=Text)


class MedrecRecord(SQLModel, table=True):
    __tablename__ = "medrec_records"
    __table_args__ = (UniqueConstraint("channel", "patient_key", "record_key", name="uq_medrec_records_key"),)

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=100)
    patient_key: str = Field(sa_type=Text)
    record_key: str = Field(sa_type=Text)
    computed_on: str = Field(max_length=10)  # the calendar day (YYYY-MM-DD) the window was counted from
    data: str = Field(sa_type=Text)


@dataclass
class SourceRow:
    """One source to store: its identity, patient, status and JSON-able data."""

    resource_type: str
    resource_id: str
    patient_key: str
    status: str
    data: dict[str, Any]
    version_time: str = ""  # when the sender last changed it (UTC ISO text); an older one never replaces


def _dumps(data: Any) -> str:
    """Compact JSON, keys in the order given (callers build their dicts in a fixed order, so equal
    data gives equal text: that is how an unchanged resend is recognised)."""
    return pydantic_core.to_json(data).decode()


def _chunks(items: Sequence[Any], size: int = 400) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def load_sources(conn: Connection, channel: str, patient_key: str) -> list[dict[str, Any]]:
    """The current sources of one patient (their data dicts), in arrival order."""
    m = marker(conn.dialect)
    cur = _cursor(conn)
    try:
        cur.execute(f"SELECT data FROM medrec_sources WHERE channel = {m} AND patient_key = {m} ORDER BY id",
                    (channel, patient_key))
        return [json.loads(crypto.open_text(row[0], SOURCE_DATA)) for row in cur.fetchall()]
    finally:
        cur.close()


class Saved(NamedTuple):
    """What `save_sources` did, so the caller recomputes without reading back what it wrote."""

    touched: set[str]  # patients whose list must be recomputed (the rows', and a moved resource's former one)
    current: dict[str, list[dict[str, Any]]]  # the rows' own patients: their current sources after the save
    fresh: set[str]  # patients who had no source stored before: they have no records to replace either


def save_sources(
    conn: Connection, channel: str, rows: Sequence[SourceRow], *, message_id: int | None, received_at: str
) -> Saved:
    """Insert or update the given sources (the last one wins when a resource comes twice). A
    row's `data` dict is the very object put in `current` when it is stored (an older version
    arriving late leaves the stored dict there instead)."""
    latest: dict[tuple[str, str], SourceRow] = {}
    for row in rows:
        latest[(row.resource_type, row.resource_id)] = row
    m = marker(conn.dialect)
    cur = _cursor(conn)
    try:
        patients = {r.patient_key for r in latest.values()}
        locking = conn.dialect.name == "postgresql"  # SQLite has one writer already
        if locking:
            # several engine processes on one database: one unit at a time per patient list, so
            # that two never recompute (delete and insert) the same records side by side, and per
            # resource, so that one resource posted for two patients at once is inserted by one
            # unit and updated (moved) by the other, as a single process does, not refused by the
            # unique key
            _lock(cur, [_patient_lock(channel, p) for p in patients]
                  + [f"medrec-resource|{channel}|{t}|{i}" for t, i in latest])
        current: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        # key -> (row id, patient, data json, version time)
        stored: dict[tuple[str, str], tuple[int, str, str, str]] = {}
        fresh: set[str] = set()
        for patient in patients:
            cur.execute(
                f"SELECT id, resource_type, resource_id, version_time, data FROM medrec_sources "
                f"WHERE channel = {m} AND patient_key = {m} ORDER BY id",
                (channel, patient),
            )
            mine = current.setdefault(patient, {})
            rows_found = cur.fetchall()
            if not rows_found:
                fresh.add(patient)
            for rid, rtype, res_id, vtime, data in rows_found:
                text = crypto.open_text(data, SOURCE_DATA)
                mine[(rtype, res_id)] = json.loads(text)
                stored[(rtype, res_id)] = (int(rid), patient, text, vtime or "")
        # a resource stored under another patient (it moved): found through the unique index, in one
        # statement for all types (a hit of another type with the same id is not one of ours)
        unknown = [key for key in latest if key not in stored]
        types = sorted({rtype for rtype, _ in unknown})
        ids = sorted({res_id for _, res_id in unknown})
        for chunk in _chunks(ids):
            cur.execute(
                f"SELECT id, resource_type, resource_id, patient_key, version_time, data FROM medrec_sources "
                f"WHERE channel = {m} AND resource_type IN ({', '.join([m] * len(types))}) "
                f"AND resource_id IN ({', '.join([m] * len(chunk))})",
                (channel, *types, *chunk),
            )
            for rid, rtype, res_id, patient, vtime, data in cur.fetchall():
                if (rtype, res_id) in latest:
                    stored[(rtype, res_id)] = (int(rid), patient, crypto.open_text(data, SOURCE_DATA), vtime or "")
        former = {stored[k][1] for k in unknown if k in stored} - patients
        if locking and former:
            # the patients moved resources leave get their lists recomputed too: theirs is taken
            # out of order (rare; a deadlock it makes is retried with the whole group)
            _lock(cur, [_patient_lock(channel, p) for p in former])

        inserts, updates, versions = [], [], []
        touched = set(patients)
        for key, row in latest.items():
            text = _dumps(row.data)
            old = stored.get(key)
            if old is not None and old[2] == text and old[1] == row.patient_key:
                continue  # a resend that changes nothing
            if old is not None and row.version_time and row.version_time < old[3]:
                continue  # an older version arriving late (a poll after a push): the stored one stands
            sealed = crypto.seal_text(text, SOURCE_DATA)
            if old is None:
                inserts.append((channel, row.patient_key, row.resource_type, row.resource_id, row.status, message_id,
                                received_at, row.version_time, sealed))
            else:
                updates.append((row.patient_key, row.status, message_id, received_at, row.version_time, sealed,
                                old[0]))
                if old[1] != row.patient_key:
                    touched.add(old[1])
                    current.get(old[1], {}).pop(key, None)
            current.setdefault(row.patient_key, {})[key] = row.data
            versions.append((channel, row.patient_key, row.resource_type, row.resource_id, message_id, received_at,
                             crypto.seal_text(text, VERSION_DATA)))
        if inserts:
            cur.executemany(
                "INSERT INTO medrec_sources (channel, patient_key, resource_type, resource_id, status, message_id, "
                f"updated_at, version_time, data) VALUES ({', '.join([m] * 9)})",
                inserts,
            )
        if updates:
            cur.executemany(
                f"UPDATE medrec_sources SET patient_key = {m}, status = {m}, message_id = {m}, updated_at = {m}, "
                f"version_time = {m}, data = {m} WHERE id = {m}",
                updates,
            )
        if versions:
            cur.executemany(
                "INSERT INTO medrec_source_versions (channel, patient_key, resource_type, resource_id, message_id, "
                f"received_at, data) VALUES ({', '.join([m] * 7)})",
                versions,
            )
    finally:
        cur.close()
    return Saved(touched, {p: list(v.values()) for p, v in current.items()}, fresh)


def _patient_lock(channel: str, patient_key: str) -> str:
    return f"medrec|{channel}|{patient_key}"


def _lock(cur: Any, keys: list[str]) -> None:
    """PostgreSQL advisory locks on `keys`, taken in one statement in sorted order (so two units
    never wait on each other crosswise); released at commit."""
    cur.execute("SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) "
                "FROM (SELECT DISTINCT unnest(%s::text[]) AS k ORDER BY 1) AS wanted", (sorted(keys),))
    cur.fetchall()


def load_sources_as_of(conn: Connection, channel: str, patient_key: str, until: str) -> list[dict[str, Any]]:
    """Each of the patient's sources as its latest version received at or before `until` (ISO UTC)."""
    m = marker(conn.dialect)
    cur = _cursor(conn)
    try:
        cur.execute(
            f"SELECT resource_type, resource_id, data FROM medrec_source_versions "
            f"WHERE channel = {m} AND patient_key = {m} AND received_at <= {m} ORDER BY received_at, id",
            (channel, patient_key, until),
        )
        latest: dict[tuple[str, str], str] = {}
        for rtype, res_id, data in cur.fetchall():
            latest[(rtype, res_id)] = data
    finally:
        cur.close()
    return [json.loads(crypto.open_text(v, VERSION_DATA)) for v in latest.values()]


def replace_records(conn: Connection, channel: str, patient_key: str, records: Sequence[tuple[str, dict[str, Any]]],
                    computed_on: str, *, stored: bool = True) -> None:
    """The patient's records become `records` ((record key, data) pairs); `stored=False` when the
    patient is known to have none yet (no source before this unit): nothing to delete."""
    m = marker(conn.dialect)
    cur = _cursor(conn)
    try:
        if stored:
            cur.execute(f"DELETE FROM medrec_records WHERE channel = {m} AND patient_key = {m}",
                        (channel, patient_key))
        if records:
            cur.executemany(
                "INSERT INTO medrec_records (channel, patient_key, record_key, computed_on, data) "
                f"VALUES ({m}, {m}, {m}, {m}, {m})",
                [(channel, patient_key, key, computed_on, crypto.seal_text(_dumps(data), RECORD_DATA))
                 for key, data in records],
            )
    finally:
        cur.close()


def load_records(conn: Connection, channel: str, patient_key: str) -> tuple[str, list[dict[str, Any]]]:
    """(the day they were computed for, "" when none; the records' data) of one patient."""
    m = marker(conn.dialect)
    cur = _cursor(conn)
    try:
        cur.execute(
            f"SELECT computed_on, data FROM medrec_records WHERE channel = {m} AND patient_key = {m} ORDER BY id",
            (channel, patient_key),
        )
        rows = cur.fetchall()
    finally:
        cur.close()
    day = rows[0][0] if rows else ""
    return day, [pydantic_core.from_json(crypto.open_text(data, RECORD_DATA)) for _, data in rows]


def patients_of(conn: Connection, channel: str) -> int:
    """How many patients have sources on the channel (for status lines)."""
    m = marker(conn.dialect)
    cur = _cursor(conn)
    try:
        cur.execute(f"SELECT COUNT(DISTINCT patient_key) FROM medrec_sources WHERE channel = {m}", (channel,))
        return int(cur.fetchone()[0])
    finally:
        cur.close()
