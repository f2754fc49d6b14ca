"""A C-FIND identifier -> an indexed SQL query, then residual matching on the candidate rows.

Single values, prefix wildcards ("SMITH*"), UID lists and the SPS date (range) on indexed columns
become WHERE clauses, so the cost follows the number of answers, not the table size. Every
candidate then goes through the full matcher (`matching.py`), which is the truth: the SQL here
only has to never drop a true match.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Engine, and_, select
from sqlalchemy.sql.elements import ColumnElement

from engine.dicom.dataset import build_response
from engine.dicom.matching import SPS_SEQ, Key, Query, _da_bounds, _make_test, compile_query, matches, matching_steps
from engine.store.db import make_read_engine
from engine.store.worklist import OPEN_STATUSES, WorklistItem, load_dataset, pn_key

__all__ = ["candidates_sql", "find", "prepare"]

T = WorklistItem.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
_TOP = "\U0010ffff"  # sorts after every other character (bytewise UTF-8 and code point order)

# keyword -> indexed column (top-level keys, then SPS keys)
_TOP_COLUMNS = {
    "PatientID": T.c.patient_id,
    "IssuerOfPatientID": T.c.issuer,
    "AccessionNumber": T.c.accession_number,
    "RequestedProcedureID": T.c.requested_procedure_id,
}
_SPS_COLUMNS = {
    "ScheduledProcedureStepID": T.c.sps_id,
    "Modality": T.c.modality,
    "ScheduledStationAETitle": T.c.station_aet,
}


def _literal_prefix(value: str) -> str:
    cut = len(value)
    for ch in "*?":
        i = value.find(ch)
        if i >= 0:
            cut = min(cut, i)
    return value[:cut]


def _string_clause(column: Any, value: str, *, prefix_only: bool = False) -> ColumnElement[bool] | None:
    if not value or value == "*" or "\\" in value:
        return None
    prefix = _literal_prefix(value)
    if prefix == value and not prefix_only:
        return column == value
    if not prefix:
        return None
    return and_(column >= prefix, column < prefix + _TOP)


def _key_clauses(keys: dict[str, Any], columns: dict[str, Any]) -> list[ColumnElement[bool]]:
    """Narrowing clauses for the non-universal keys that have an indexed column."""
    out = []
    for kw, column in columns.items():
        key = keys.get(kw)
        if key is not None and not key.universal:
            clause = _string_clause(column, key.value)
            if clause is not None:
                out.append(clause)
    return out


def _clauses(query: Query) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [T.c.status.in_(OPEN_STATUSES)]
    top = {k.keyword: k for k in query.keys}
    sps = {k.keyword: k for k in query.sps}
    where += _key_clauses(top, _TOP_COLUMNS)
    name = top.get("PatientName")
    if name is not None and not name.universal and "\\" not in name.value:
        # the matcher also accepts the first component group alone: narrow by prefix only
        clause = _string_clause(T.c.patient_name_key, pn_key(name.value), prefix_only=True)
        if clause is not None:
            where.append(clause)
    uid = top.get("StudyInstanceUID")
    if uid is not None and not uid.universal:
        uids = [u.strip() for u in uid.value.split("\\") if u.strip()]
        if uids:
            where.append(T.c.study_instance_uid.in_(uids))
    where += _key_clauses(sps, _SPS_COLUMNS)
    date = sps.get("ScheduledProcedureStepStartDate")
    if date is not None and not date.universal:
        lo, hi = _da_bounds(date.value)
        where.append(T.c.sps_start >= (lo or "0"))
        if hi:
            where.append(T.c.sps_start < hi + "~")
    return where


def candidates_sql(query: Query) -> Any:
    """The narrowing SELECT for a compiled query (exposed for EXPLAIN in tests and benchmarks)."""
    return select(T.c.status, T.c.dataset_json).where(and_(*_clauses(query))).order_by(T.c.sps_start, T.c.id)


def prepare(identifier: Dataset, *, caller_aet: str = "", station_from_caller: bool = False) -> Query:
    """Compile the identifier; with `station_from_caller`, a universal/absent station key becomes the caller's AE."""
    query = compile_query(identifier)
    if station_from_caller and caller_aet:
        station = next((k for k in query.sps if k.keyword == "ScheduledStationAETitle"), None)
        if station is None or station.universal:
            query.sps = [k for k in query.sps if k.keyword != "ScheduledStationAETitle"]
            query.sps.append(
                Key("ScheduledStationAETitle", "AE", caller_aet, test=_make_test(caller_aet.strip(), "AE"))
            )
    return query


# the row's status as the SPS Status (0040,0020) defined term: a step the modality began
# (MPPS IN PROGRESS) is STARTED
_SPS_STATUS_TERM = {"IN PROGRESS": "STARTED"}


def _with_status(item: dict[str, Any], status: str) -> dict[str, Any]:
    term = _SPS_STATUS_TERM.get(status, status)
    for step in item.get(SPS_SEQ) or []:
        if isinstance(step, dict):
            step["ScheduledProcedureStepStatus"] = term
    return item


def find(
    db_engine: Engine, identifier: Dataset, *, caller_aet: str = "", station_from_caller: bool = False
) -> Iterator[Dataset]:
    """Answers to a MWL C-FIND identifier (raises MalformedQuery for an invalid one).

    Rows are read on a connection of its own and released before the first answer is yielded, so
    a slow network peer never holds a database connection.
    """
    query = prepare(identifier, caller_aet=caller_aet, station_from_caller=station_from_caller)
    with make_read_engine(db_engine).connect() as conn:
        rows = conn.execute(candidates_sql(query)).all()
    return _answers(query, identifier, rows)


def _answers(query: Query, identifier: Dataset, rows: Sequence[Any]) -> Iterator[Dataset]:
    for status, text in rows:
        item = _with_status(load_dataset(text), status)
        if matches(query, item):
            yield build_response(identifier, item, steps=matching_steps(query, item), hoisted=query.hoisted)
