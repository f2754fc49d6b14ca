"""The ImagingStudy builder on plain data: what it writes, what it drops (with a warning), and that
the result validates as R4 (fhir.resources R4B)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from engine.fhir.imagingstudy import InstanceData, SeriesData, StudyData, build_imaging_study, dicom_datetime, pn_text
from engine.fhir.models import validate_resource
from engine.fhir.resources import plan_resources

TZ = ZoneInfo("Europe/Berlin")


def test_dicom_dates_and_names() -> None:
    assert dicom_datetime("20261201101500.123", TZ) == "2026-12-01T10:15:00+01:00"
    assert dicom_datetime("20260701", TZ) == "2026-07-01"
    assert dicom_datetime("202612011015", TZ) == "2026-12-01T10:15:00+01:00"
    assert dicom_datetime("2026-12-01", TZ) == "" and dicom_datetime("20261341", TZ) == ""
    assert pn_text("DOE^JANE^M^DR") == "DR JANE M DOE" and pn_text("^^") == ""


def test_messy_study_is_built_and_valid() -> None:
    study = StudyData(
        "1.2.3", "P1", accession="A1", started="20261201", referrer="^^", modalities=["CT", "SR"],
        procedure_codes=[{"code": "X", "system": "", "display": ""}, {"code": ""}],
        series=[
            SeriesData("1.2.3.1", "", None, body_part="LEFT LITTLE TOE", laterality="Q",
                       instances=[InstanceData("1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", 1),
                                  InstanceData("1.2.3.1.2", "", 2)]),
            SeriesData("1.2.3.2", "CT", 2, started="20261201101500", performers=["TECH^TOM", ""]),
        ],
    )
    [resource], patient, warnings = build_imaging_study(study, tz=TZ, wadors_url="http://pacs/wado")
    assert warnings == ["series 1.2.3.1: no Modality, written as OT", "instance 1.2.3.1.2: no SOPClassUID, left out"]
    assert resource["numberOfSeries"] == 2 and resource["numberOfInstances"] == 1
    first, second = resource["series"]
    assert first["modality"]["code"] == "OT" and first["bodySite"] == {"display": "LEFT LITTLE TOE"}
    assert "laterality" not in first and "number" not in first
    assert second["started"] == "2026-12-01T10:15:00+01:00" and second["performer"] == [
        {"actor": {"display": "TOM TECH"}}]
    assert "referrer" not in resource and resource["started"] == "2026-12-01"
    assert [m["code"] for m in resource["modality"]] == ["CT", "SR"]
    assert resource["procedureCode"] == [{"coding": [{"system": "urn:engine:id:procedure", "code": "X"}]}]
    assert resource["basedOn"] == [{"type": "ServiceRequest", "identifier": {"system": "accession", "value": "A1"}}]
    plan = plan_resources([resource], {"accession": "urn:oid:9.9", "mrn": "urn:oid:9.8"}, "create", patient)
    assert [e.type for e in plan.entries] == ["Patient", "ImagingStudy"]
    assert plan.entries[1].key == "urn:dicom:uid|urn:oid:1.2.3"
    for entry in plan.entries:
        validate_resource(entry.resource)
    assert plan.entries[1].resource["subject"] == {"reference": "Patient?identifier=urn:oid:9.8|P1"}
