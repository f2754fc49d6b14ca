"""The shipped worklist mappings over the shipped samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ProcessingError
from engine.hl7.er7 import Message
from engine.mapping import check_examples, load_mapping, to_dataset
from engine.mapping.formats import valid_uid

ROOT = Path(__file__).resolve().parents[2]
MAPPINGS = ROOT / "mappings"
SAMPLES = ROOT / "samples" / "hl7"


@pytest.fixture(scope="module")
def orm_mapping():
    return load_mapping(MAPPINGS / "orm-to-worklist.yaml")


@pytest.fixture(scope="module")
def adt_mapping():
    return load_mapping(MAPPINGS / "adt-to-worklist.yaml")


def sample(name: str) -> Message:
    return Message.parse((SAMPLES / name).read_bytes())


@pytest.mark.parametrize("name", ["orm-to-worklist.yaml", "adt-to-worklist.yaml"])
def test_shipped_examples_pass(name):
    m = load_mapping(MAPPINGS / name)
    assert m.examples, "a shipped mapping keeps its examples"
    assert check_examples(m) == []


def test_orm_ct_gives_the_contract_shape(orm_mapping):
    (out,) = orm_mapping.run(sample("orm_o01_ct.hl7"))
    assert out["control"] == {"order_control": "NW", "order_status": "SC"}
    ds = out["dataset"]
    assert ds["PatientID"] == "100234" and ds["IssuerOfPatientID"] == "HOSP"
    assert ds["PatientName"] == "Doe^Jane^Anne^Mrs"
    assert ds["AccessionNumber"] == "ACC1001" and ds["RequestedProcedurePriority"] == "ROUTINE"
    assert ds["StudyInstanceUID"] == "1.2.826.0.1.3680043.8.498.1001"
    (sps,) = ds["ScheduledProcedureStepSequence"]
    assert sps["ScheduledProcedureStepStartDate"] == "20261125"
    assert sps["ScheduledProcedureStepStartTime"] == "100000"
    assert sps["Modality"] == "CT" and sps["ScheduledStationAETitle"] == "CT1"
    keys = {
        "SpecificCharacterSet",
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
        "AdmissionID",
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
        "RequestedProcedurePriority",
        "AccessionNumber",
        "RequestedProcedureID",
        "StudyInstanceUID",
        "RequestedProcedureDescription",
        "RequestedProcedureCodeSequence",
        "RequestingPhysician",
        "ReasonForTheRequestedProcedure",
        "ScheduledProcedureStepSequence",
    }
    assert set(ds) == keys
    assert set(sps) == {
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "Modality",
        "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepDescription",
        "ScheduledProtocolCodeSequence",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepLocation",
        "ScheduledStationName",
    }
    # every value is valid for its VR
    to_dataset(ds, validate=True)


def test_two_orders_two_items_with_stable_derived_uids(orm_mapping):
    outs = orm_mapping.run(sample("orm_o01_two_orders.hl7"))
    assert [o["dataset"]["AccessionNumber"] for o in outs] == ["ACC2001", "ACC2002"]
    uids = [o["dataset"]["StudyInstanceUID"] for o in outs]
    assert uids[0] != uids[1] and all(valid_uid(u) for u in uids)
    again = orm_mapping.run(sample("orm_o01_two_orders.hl7"))
    assert [o["dataset"]["StudyInstanceUID"] for o in again] == uids


def test_omi_prefers_ipc(orm_mapping):
    (out,) = orm_mapping.run(sample("omi_o23.hl7"))
    ds = out["dataset"]
    assert ds["StudyInstanceUID"] == "1.2.826.0.1.3680043.8.498.3001"
    assert ds["ScheduledProcedureStepSequence"][0]["ScheduledStationAETitle"] == "MRI1"
    assert ds["ScheduledProcedureStepSequence"][0]["ScheduledProcedureStepStartTime"] == "140000"


def test_latin1_names_and_charset(orm_mapping):
    (out,) = orm_mapping.run(sample("orm_latin1.hl7"))
    assert out["dataset"]["SpecificCharacterSet"] == "ISO_IR 100"
    assert out["dataset"]["PatientName"].startswith("Müller^Jürgen")


def test_orm_missing_patient_id_is_refused(orm_mapping):
    text = (SAMPLES / "orm_o01_ct.hl7").read_text().replace("100234^^^HOSP^MR", "")
    with pytest.raises(ProcessingError) as err:
        orm_mapping.run(Message.parse(text))
    assert err.value.code == 101 and err.value.location == "PID-3.1"
    assert err.value.source.startswith("mappings/orm-to-worklist.yaml:")


def test_adt_a08_and_a40(adt_mapping):
    (a08,) = adt_mapping.run(sample("adt_a08.hl7"))
    assert a08["control"] == {"event": "A08"}
    assert a08["dataset"]["PatientName"] == "Doe^Janet^Anne^Mrs"
    (a40,) = adt_mapping.run(sample("adt_a40.hl7"))
    assert a40["control"] == {"event": "A40", "prior_patient_id": "999001", "prior_issuer": "HOSP"}
    assert a40["dataset"]["PatientID"] == "100234"
