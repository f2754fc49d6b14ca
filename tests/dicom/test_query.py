"""The indexed query: SQL narrows on indexed columns, the matcher decides; both on a real SQLite file."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine, text
from wl_helpers import make_item

from engine.dicom.matching import compile_query, matches
from engine.dicom.query import candidates_sql, find
from engine.store.worklist import insert_item, set_status

NAMES = ["Doe^John", "DOE^JANE", "Dobbs^Ann", "Smith^Bob", "Müller^Jürgen", "Yamada^Tarou=山田^太郎", "O'Neil^Pat"]


def fill(engine: Engine) -> list[dict[str, Any]]:
    items = []
    with engine.begin() as conn:
        for n, (name, day, station) in enumerate(
            itertools.product(NAMES, ["20261124", "20261125", "20261126"], ["CT1", "MR1"])
        ):
            item = make_item(
                PatientName=name,
                PatientID=f"P{n % 5}",
                AccessionNumber=f"ACC{n:03d}",
                RequestedProcedureID=f"RP{n}",
                StudyInstanceUID=f"1.2.3.{n}",
                FillerOrderNumberImagingServiceRequest=f"F{n}",
                sps={
                    "ScheduledStationAETitle": station,
                    "Modality": station[:2],
                    "ScheduledProcedureStepStartDate": day,
                    "ScheduledProcedureStepStartTime": f"{8 + n % 10:02d}{(n * 7) % 60:02d}00",
                    "ScheduledProcedureStepID": f"S{n}",
                },
            )
            item_id = insert_item(conn, item)
            if n % 13 == 0:
                set_status(conn, item_id, "CANCELLED")
            else:
                items.append(item)
    return items


def q(sps: dict[str, str] | None = None, **top: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AccessionNumber = ""
    for k, v in top.items():
        setattr(ds, k, v)
    step = Dataset()
    for k in (
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "Modality",
    ):
        setattr(step, k, "")
    for k, v in (sps or {}).items():
        setattr(step, k, v)
    ds.ScheduledProcedureStepSequence = [step]
    return ds


QUERIES = [
    q(),
    q(AccessionNumber="ACC007"),
    q(AccessionNumber="ACC00*"),
    q(AccessionNumber="*7"),
    q(PatientID="P3"),
    q(PatientName="doe*"),
    q(PatientName="DO*^J*"),
    q(PatientName="müller^jürgen"),
    q(PatientName="YAMADA^TAROU"),
    q(PatientName="*^Bob"),
    q(PatientName="O'N?il*"),
    q(StudyInstanceUID="1.2.3.4\\1.2.3.5\\1.2.3.99"),
    q(RequestedProcedureID="RP1?"),
    q(sps={"ScheduledStationAETitle": "CT1", "ScheduledProcedureStepStartDate": "20261125"}),
    q(sps={"Modality": "MR", "ScheduledProcedureStepStartDate": "20261125-"}),
    q(sps={"ScheduledProcedureStepStartDate": "-20261124"}),
    q(sps={"ScheduledProcedureStepStartDate": "20261124-20261125", "ScheduledProcedureStepStartTime": "1200-0900"}),
    q(sps={"ScheduledProcedureStepStartTime": "0800-0930"}),
    q(sps={"ScheduledStationAETitle": "C*", "ScheduledProcedureStepID": "S1*"}),
    q(Modality="CT", ScheduledStationAETitle="CT1"),
]


@pytest.mark.parametrize("index", range(len(QUERIES)))
def test_indexed_query_equals_brute_force_matching(any_engine: Engine, index: int) -> None:
    items = fill(any_engine)
    query = QUERIES[index]
    expected = sorted(i["AccessionNumber"] for i in items if matches(compile_query(query), i))
    got = sorted(a.AccessionNumber for a in find(any_engine, query))
    assert got == expected
    if index:
        assert len(got) < len(items)  # every query here is selective


def test_cancelled_items_are_never_returned(sqlite_engine: Engine) -> None:
    fill(sqlite_engine)
    assert list(find(sqlite_engine, q(AccessionNumber="ACC013"))) == []
    assert len(list(find(sqlite_engine, q(AccessionNumber="ACC014")))) == 1


def test_answers_are_ordered_by_start(sqlite_engine: Engine) -> None:
    fill(sqlite_engine)
    answers = list(find(sqlite_engine, q(sps={"ScheduledStationAETitle": "CT1"})))
    starts = [
        a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate
        + a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime
        for a in answers
    ]
    assert starts == sorted(starts) and len(starts) > 10


def _plan(engine: Engine, query: Dataset) -> str:
    stmt = candidates_sql(compile_query(query)).compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        return " ".join(str(r[-1]) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {stmt}")))


@pytest.mark.parametrize(
    "query,index",
    [
        (q(AccessionNumber="ACC007"), "ix_worklist_items_accession_number"),
        (q(PatientID="P1"), "ix_worklist_patient"),
        (q(PatientName="SMITH*"), "ix_worklist_items_patient_name_key"),
        (
            q(sps={"ScheduledStationAETitle": "CT1", "ScheduledProcedureStepStartDate": "20261125"}),
            "ix_worklist_station_start",
        ),
        (q(sps={"Modality": "CT", "ScheduledProcedureStepStartDate": "20261125"}), "ix_worklist_modality_start"),
    ],
)
def test_query_shapes_use_an_index(sqlite_engine: Engine, query: Dataset, index: str) -> None:
    fill(sqlite_engine)
    plan = _plan(sqlite_engine, query)
    assert index in plan, plan
