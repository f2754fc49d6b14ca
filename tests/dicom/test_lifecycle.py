"""The `worklist` destination's order lifecycle, fed contract-shaped outputs, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select, update
from wl_helpers import make_item

from engine.dicom.query import find
from engine.errors import ProcessingError
from engine.runtime.destinations.base import MessageContext
from engine.runtime.destinations.worklist import WorklistDestination, WorklistDestinationConfig, register
from engine.runtime.jobs_worklist import purge_worklist
from engine.runtime.registry import Registry
from engine.store.worklist import WorklistItem

T = WorklistItem.__table__  # type: ignore[attr-defined]
START_DATE = "ScheduledProcedureStepStartDate"


def destination(**config: Any) -> WorklistDestination:
    return WorklistDestination(WorklistDestinationConfig(name="wl", type="worklist", **config))


def ctx(control_id: str = "MSG1") -> MessageContext:
    return MessageContext(
        channel="ris-orders",
        raw=b"",
        view=None,
        message_type="ORM^O01",
        control_id=control_id,
        patient_id="",
        received_at=datetime(2026, 11, 1),
    )


def order(oc: str, os_: str, **dataset: Any) -> dict[str, Any]:
    sps = dataset.pop("sps", None)
    return {"control": {"order_control": oc, "order_status": os_}, "dataset": make_item(sps, **dataset)}


def apply(engine: Engine, *outputs: dict[str, Any], dest: WorklistDestination | None = None) -> None:
    with engine.begin() as conn:
        (dest or destination()).apply(conn, ctx(), list(outputs))


def rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        found = [dict(r) for r in conn.execute(select(T).order_by(T.c.id)).mappings()]
    for r in found:
        r["dataset"] = json.loads(r["dataset_json"])
    return found


def mwl(engine: Engine, **top: str) -> list[Dataset]:
    q = Dataset()
    q.PatientID = ""
    q.PatientName = ""
    q.StudyInstanceUID = ""
    for k, v in top.items():
        setattr(q, k, v)
    step = Dataset()
    step.ScheduledProcedureStepStartDate = ""
    step.ScheduledProcedureStepStartTime = ""
    step.ScheduledStationAETitle = ""
    q.ScheduledProcedureStepSequence = [step]
    return list(find(engine, q))


def test_register_adds_the_worklist_type() -> None:
    registry = Registry()
    register(registry)
    assert registry.destinations["worklist"] is WorklistDestination


def test_new_order_creates_a_scheduled_item(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"))
    [row] = rows(any_engine)
    assert row["status"] == "SCHEDULED"
    assert row["filler_order"] == "FI1" and row["accession_number"] == "ACC1"
    assert row["sps_start"] == "20261125093000" and row["station_aet"] == "CT1"
    [answer] = mwl(any_engine, AccessionNumber="ACC1")
    assert answer.PatientID == "P1"


def test_new_order_with_two_steps_makes_two_rows(any_engine: Engine) -> None:
    out = order("NW", "SC")
    second = dict(out["dataset"]["ScheduledProcedureStepSequence"][0], ScheduledProcedureStepID="SPS2", Modality="MR")
    out["dataset"]["ScheduledProcedureStepSequence"].append(second)
    apply(any_engine, out)
    assert sorted(r["sps_id"] for r in rows(any_engine)) == ["SPS1", "SPS2"]
    assert all(len(r["dataset"]["ScheduledProcedureStepSequence"]) == 1 for r in rows(any_engine))


def test_reschedule_updates_time_room_and_procedure(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"))
    moved = order(
        "XO",
        "SC",
        StudyInstanceUID="",
        RequestedProcedureDescription="CT HEAD WITH CONTRAST",
        sps={"ScheduledProcedureStepStartTime": "141500", "ScheduledStationAETitle": "CT2"},
    )
    apply(any_engine, moved)
    [row] = rows(any_engine)
    assert row["sps_start"] == "20261125141500" and row["station_aet"] == "CT2"
    assert row["dataset"]["RequestedProcedureDescription"] == "CT HEAD WITH CONTRAST"
    assert row["study_instance_uid"] == "1.2.826.0.1.3680043.10.1.1"  # kept: the update had none
    assert row["status"] == "SCHEDULED"


def test_new_order_for_existing_order_updates_it(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"))
    apply(any_engine, order("NW", "SC", sps={"ScheduledStationAETitle": "CT3"}))
    [row] = rows(any_engine)
    assert row["station_aet"] == "CT3"


def test_new_order_for_existing_order_rejected_when_configured(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"))
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, order("NW", "SC"), dest=destination(on_existing_new="reject"))
    assert err.value.code == 205 and err.value.location == "ORC-3"


@pytest.mark.parametrize(
    "oc,os_,status",
    [("CA", "CA", "CANCELLED"), ("DC", "CA", "DISCONTINUED"), ("XO", "CM", "COMPLETED")],
)
def test_status_changes(any_engine: Engine, oc: str, os_: str, status: str) -> None:
    apply(any_engine, order("NW", "SC"))
    apply(any_engine, order(oc, os_))
    [row] = rows(any_engine)
    assert row["status"] == status
    assert mwl(any_engine, AccessionNumber="ACC1") == []  # finished steps are not served


def test_unknown_order_control_pair_is_refused_and_nothing_changes(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"))
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, order("XO", "SC", sps={"ScheduledStationAETitle": "CT9"}), order("SC", "IP"))
    assert err.value.code == 103 and err.value.location == "ORC-1"
    assert rows(any_engine)[0]["station_aet"] == "CT1"  # the first output was rolled back too
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, order("", "SC"))
    assert err.value.code == 101 and err.value.location == "ORC-1"


def test_status_map_is_configurable(any_engine: Engine) -> None:
    dest = destination(status_map={"NW_SC": "SCHEDULED", "SC_IP": "IN PROGRESS"})
    apply(any_engine, order("NW", "SC"), dest=dest)
    apply(any_engine, order("SC", "IP"), dest=dest)
    assert rows(any_engine)[0]["status"] == "IN PROGRESS"
    with pytest.raises(ProcessingError):
        apply(any_engine, order("CA", "CA"), dest=dest)
    with pytest.raises(ValueError):
        destination(status_map={"NW_SC": "PLANNED"})


def test_update_keeps_a_started_step_in_progress(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"))
    with any_engine.begin() as conn:
        conn.execute(update(T).values(status="IN PROGRESS"))
    apply(any_engine, order("XO", "SC", sps={"ScheduledStationAETitle": "CT2"}))
    [row] = rows(any_engine)
    assert row["status"] == "IN PROGRESS" and row["station_aet"] == "CT2"


@pytest.mark.parametrize("oc,os_", [("XO", "SC"), ("CA", "CA"), ("DC", "CA"), ("XO", "CM")])
def test_update_or_cancel_of_unknown_order(any_engine: Engine, oc: str, os_: str) -> None:
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, order(oc, os_))
    assert err.value.code == 204 and err.value.location == "ORC-3"
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, order(oc, os_, FillerOrderNumberImagingServiceRequest=""))
    assert err.value.code == 204 and err.value.location == "ORC-2"
    assert rows(any_engine) == []


def test_placer_order_identity_with_accession(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC", FillerOrderNumberImagingServiceRequest=""))
    apply(any_engine, order("NW", "SC", FillerOrderNumberImagingServiceRequest="", AccessionNumber="ACC2"))
    assert len(rows(any_engine)) == 2  # same placer number, another accession: another order
    apply(any_engine, order("CA", "CA", FillerOrderNumberImagingServiceRequest="", AccessionNumber="ACC2"))
    assert [r["status"] for r in rows(any_engine)] == ["SCHEDULED", "CANCELLED"]


def test_update_may_not_move_the_order_to_another_patient(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"))
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, order("XO", "SC", PatientID="P2"))
    assert err.value.location == "PID-3"
    assert rows(any_engine)[0]["patient_id"] == "P1"


def adt(event: str, **dataset: Any) -> dict[str, Any]:
    control: dict[str, Any] = {"event": event}
    for k in ("prior_patient_id", "prior_issuer"):
        if k in dataset:
            control[k] = dataset.pop(k)
    return {"control": control, "dataset": dataset}


def test_a08_updates_demographics_of_open_items_only(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC"), order("NW", "SC", FillerOrderNumberImagingServiceRequest="FI2"))
    apply(any_engine, order("CA", "CA", FillerOrderNumberImagingServiceRequest="FI2"))
    apply(
        any_engine,
        adt("A08", PatientID="P1", IssuerOfPatientID="HOSP", PatientName="Doe^Johnny", PatientBirthDate="19700202"),
    )
    open_row, cancelled = rows(any_engine)
    assert open_row["dataset"]["PatientName"] == "Doe^Johnny" and open_row["patient_name_key"] == "DOE^JOHNNY"
    assert open_row["dataset"]["PatientBirthDate"] == "19700202"
    assert open_row["dataset"]["PatientSex"] == "M"  # not sent: kept
    assert cancelled["dataset"]["PatientName"] == "Doe^John^^^"
    assert [str(a.PatientName) for a in mwl(any_engine, PatientName="doe^johnny")] == ["Doe^Johnny"]


def test_a40_moves_open_items_to_the_surviving_patient(any_engine: Engine) -> None:
    apply(any_engine, order("NW", "SC", PatientID="OLD", PatientName="Doe^J"))
    apply(any_engine, order("NW", "SC", PatientID="KEEP", FillerOrderNumberImagingServiceRequest="FI2"))
    merge = adt("A40", PatientID="KEEP", IssuerOfPatientID="HOSP", PatientName="Doe^John", prior_patient_id="OLD")
    apply(any_engine, merge)
    assert {r["patient_id"] for r in rows(any_engine)} == {"KEEP"}
    assert {str(a.PatientName) for a in mwl(any_engine, PatientID="KEEP")} == {"Doe^John", "Doe^John^^^"}
    assert mwl(any_engine, PatientID="OLD") == []
    # after the merge the order may be updated under the surviving id
    apply(any_engine, order("XO", "SC", PatientID="KEEP", sps={"ScheduledStationAETitle": "CT2"}))
    assert rows(any_engine)[0]["station_aet"] == "CT2"


def test_adt_without_identifiers_is_refused(any_engine: Engine) -> None:
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, adt("A08", PatientName="X"))
    assert err.value.location == "PID-3"
    with pytest.raises(ProcessingError) as err:
        apply(any_engine, adt("A40", PatientID="KEEP"))
    assert err.value.location == "MRG-1"


def test_purge(any_engine: Engine) -> None:
    today = datetime.now().strftime("%Y%m%d")
    old_day = (datetime.now() - timedelta(days=30)).strftime("%Y%m%d")
    apply(
        any_engine,
        order("NW", "SC", FillerOrderNumberImagingServiceRequest="DONE"),
        order("NW", "SC", FillerOrderNumberImagingServiceRequest="RECENT-DONE"),
        order(
            "NW", "SC", FillerOrderNumberImagingServiceRequest="STALE", sps={"ScheduledProcedureStepStartDate": old_day}
        ),
        order(
            "NW", "SC", FillerOrderNumberImagingServiceRequest="TODAY", sps={"ScheduledProcedureStepStartDate": today}
        ),
    )
    apply(
        any_engine,
        order("XO", "CM", FillerOrderNumberImagingServiceRequest="DONE"),
        order("CA", "CA", FillerOrderNumberImagingServiceRequest="RECENT-DONE"),
    )
    with any_engine.begin() as conn:
        long_ago = datetime.now() - timedelta(days=10)
        conn.execute(update(T).where(T.c.filler_order == "DONE").values(updated_at=long_ago))
    deleted = purge_worklist(any_engine, timedelta(hours=72), timedelta(days=7))
    assert deleted == 2
    assert sorted(r["filler_order"] for r in rows(any_engine)) == ["RECENT-DONE", "TODAY"]
