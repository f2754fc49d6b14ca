"""The worklist table's functions on SQLite and PostgreSQL (Core connection, caller-owned transaction)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from engine.store.db import make_engine
from engine.store.worklist import (
    WorklistItem,
    columns_for,
    find_item,
    find_items,
    insert_item,
    insert_many,
    merge_patient,
    normalize_tm,
    pn_key,
    purge,
    set_status,
    update_item,
    update_patient,
)

T = WorklistItem.__table__  # type: ignore[attr-defined]


@pytest.fixture
def wl_db(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    WorklistItem.__table__.create(eng)  # type: ignore[attr-defined]
    yield eng
    eng.dispose()


def item(**kw: Any) -> dict[str, Any]:
    sps = {
        "ScheduledStationAETitle": kw.pop("station", "CT1"),
        "ScheduledProcedureStepStartDate": kw.pop("date", "20261125"),
        "ScheduledProcedureStepStartTime": kw.pop("time", "0930"),
        "Modality": "CT",
        "ScheduledProcedureStepID": kw.pop("sps_id", "S1"),
        "ScheduledProcedureStepStatus": "SCHEDULED",
    }
    base = {
        "PatientID": "P1",
        "IssuerOfPatientID": "HOSP",
        "PatientName": "Müller^Jürgen^^^",
        "PatientSex": "M",
        "AccessionNumber": "A1",
        "FillerOrderNumberImagingServiceRequest": "F1",
        "PlacerOrderNumberImagingServiceRequest": "PL1",
        "ScheduledProcedureStepSequence": [sps],
    }
    base.update(kw)
    return base


def test_columns_for_normalises_keys() -> None:
    cols = columns_for(item(time="09:30"))
    assert cols["patient_name_key"] == "MÜLLER^JÜRGEN"
    assert cols["sps_start_date"] == "20261125" and cols["sps_start_time"] == "093000"
    assert cols["sps_start"] == "20261125093000"
    assert cols["station_aet"] == "CT1" and cols["filler_order"] == "F1"
    assert normalize_tm("1015") == "101500" and normalize_tm("101500.25") == "101500.25"
    assert pn_key("Yamada^Tarou^^=山田^太郎==") == "YAMADA^TAROU=山田^太郎"
    assert columns_for({})["sps_start"] == ""


def test_insert_find_update_status(wl_db: Engine) -> None:
    with wl_db.begin() as conn:
        item_id = insert_item(conn, item(), channel="ris")
        assert find_item(conn, filler_order="F1")["id"] == item_id  # type: ignore[index]
        assert find_item(conn, placer_order="PL1", accession_number="A1")["id"] == item_id  # type: ignore[index]
        assert find_item(conn, placer_order="PL1", accession_number="A2") is None
        assert find_item(conn, filler_order="F9") is None
        assert find_item(conn) is None
        update_item(conn, item_id, item(station="CT2", PatientName="Doe^Jane"))
        set_status(conn, item_id, "CANCELLED")
    with wl_db.connect() as conn:
        [row] = find_items(conn, filler_order="F1")
    assert row["station_aet"] == "CT2" and row["patient_name_key"] == "DOE^JANE" and row["status"] == "CANCELLED"
    assert row["channel"] == "ris"
    assert row["dataset"]["ScheduledProcedureStepSequence"][0]["ScheduledProcedureStepStatus"] == "CANCELLED"


def test_functions_never_commit(wl_db: Engine) -> None:
    with wl_db.connect() as conn:
        insert_item(conn, item())
        conn.rollback()
    with wl_db.connect() as conn:
        assert conn.execute(select(T.c.id)).all() == []


def test_update_patient_touches_open_items_only(wl_db: Engine) -> None:
    with wl_db.begin() as conn:
        open_id = insert_item(conn, item())
        done_id = insert_item(conn, item(FillerOrderNumberImagingServiceRequest="F2"))
        other = insert_item(conn, item(PatientID="P2", FillerOrderNumberImagingServiceRequest="F3"))
        set_status(conn, done_id, "COMPLETED")
        assert update_patient(conn, "P1", "HOSP", {"PatientName": "Muller^Jurgen", "PatientSex": ""}) == 1
    with wl_db.connect() as conn:
        names = dict(conn.execute(select(T.c.id, T.c.patient_name_key)).all())
        ds = find_item(conn, filler_order="F1")["dataset"]  # type: ignore[index]
    assert names == {open_id: "MULLER^JURGEN", done_id: "MÜLLER^JÜRGEN", other: "MÜLLER^JÜRGEN"}
    assert ds["PatientSex"] == ""


def test_merge_patient_moves_open_items(wl_db: Engine) -> None:
    with wl_db.begin() as conn:
        insert_item(conn, item(PatientID="OLD"))
        insert_item(conn, item(PatientID="OLD", IssuerOfPatientID="", FillerOrderNumberImagingServiceRequest="F2"))
        insert_item(
            conn, item(PatientID="OLD", IssuerOfPatientID="ELSEWHERE", FillerOrderNumberImagingServiceRequest="F3")
        )
        moved = merge_patient(conn, "OLD", "HOSP", "NEW", "HOSP", {"PatientName": "New^Name"})
    assert moved == 2
    with wl_db.connect() as conn:
        ids = sorted(conn.execute(select(T.c.filler_order, T.c.patient_id, T.c.issuer)).all())
    assert ids == [("F1", "NEW", "HOSP"), ("F2", "NEW", "HOSP"), ("F3", "OLD", "ELSEWHERE")]


def test_purge_rules(wl_db: Engine) -> None:
    now = datetime(2026, 12, 31, 12, 0)
    with wl_db.begin() as conn:
        insert_many(
            conn,
            [
                item(FillerOrderNumberImagingServiceRequest="fresh", date="20261230"),
                item(FillerOrderNumberImagingServiceRequest="stale", date="20261201"),
                item(FillerOrderNumberImagingServiceRequest="undated", date=""),
            ],
            now=now - timedelta(days=40),
        )
        done = insert_item(conn, item(FillerOrderNumberImagingServiceRequest="done-old"), now=now - timedelta(days=5))
        set_status(conn, done, "COMPLETED", now=now - timedelta(days=5))
        recent = insert_item(conn, item(FillerOrderNumberImagingServiceRequest="done-new"), now=now)
        set_status(conn, recent, "CANCELLED", now=now - timedelta(hours=1))
        progress = insert_item(conn, item(FillerOrderNumberImagingServiceRequest="running", date="20261101"))
        set_status(conn, progress, "IN PROGRESS", now=now - timedelta(days=60))
        assert purge(conn, now, timedelta(hours=72), timedelta(days=7)) == 2
    with wl_db.connect() as conn:
        left = sorted(r[0] for r in conn.execute(select(T.c.filler_order)))
    assert left == ["done-new", "fresh", "running", "undated"]


def test_prefix_bounds_are_bytewise(wl_db: Engine) -> None:
    """The C-FIND narrowing relies on >= prefix AND < prefix + U+10FFFF holding every extension."""
    names = ["SMITH", "SMITH^JOHN", "SMITH-JONES", "SMITHÉ", "SMITH山田", "SMITI", "SMITG", "smith"]
    with wl_db.begin() as conn:
        for n, name in enumerate(names):
            insert_item(conn, item(PatientName=name, FillerOrderNumberImagingServiceRequest=f"F{n}"))
        prefix = "SMITH"
        hits = conn.execute(
            select(T.c.patient_name_key).where(
                T.c.patient_name_key >= prefix, T.c.patient_name_key < prefix + "\U0010ffff"
            )
        ).all()
    assert sorted(h[0] for h in hits) == sorted(["SMITH", "SMITH^JOHN", "SMITH-JONES", "SMITHÉ", "SMITH山田", "SMITH"])
