"""The pure parts: report building, systems and patient references, validation text, Retry-After."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from engine.errors import ProcessingError
from engine.fhir.client import retry_after
from engine.fhir.models import FHIRValidationError, validate_resource
from engine.fhir.resources import plan_resources
from engine.fhir.results import ReportError, ReportOptions, build_report
from engine.fhir.writer import is_older
from engine.hl7.er7 import Message
from engine.mapping import load_mapping
from engine.runtime.destinations.fhir import FhirDestination, FhirDestinationConfig

ROOT = Path(__file__).resolve().parents[2]


def report(**extra: object) -> dict:
    return {"DiagnosticReport": {"identifier": [{"system": "filler", "value": "F1"}], "status": "final",
                                 "code": {"text": "CT"}, **extra}, "observations": []}


def test_text_runs_blank_lines_and_conclusion() -> None:
    out = report()
    out["observations"] = [
        {"_type": "TX", "_text": "FINDINGS:"}, {"_type": "TX"}, {"_type": "TX", "_text": "Nothing."},
        {"_type": "TX", "_text": "IMPRESSION: Normal."}, {"_type": "TX", "_text": "No follow-up."},
        {"_type": "TX", "_text": "RECOMMENDATION:"}, {"_type": "TX", "_text": "None."},
    ]
    [dr] = build_report(out, ReportOptions(language="en"))
    [form] = dr["presentedForm"]
    assert base64.b64decode(form["data"]).decode() == (
        "FINDINGS:\n\nNothing.\nIMPRESSION: Normal.\nNo follow-up.\nRECOMMENDATION:\nNone.")
    assert form["language"] == "en" and form["title"] == "Report"
    assert dr["conclusion"] == "Normal.\nNo follow-up."


def test_observation_identifiers_are_stable_and_unique() -> None:
    out = report()
    out["observations"] = [
        {"_type": "NM", "_code_id": "SIZE", "_sub_id": "1", "_value": "12", "code": {"text": "size"}},
        {"_type": "NM", "_code_id": "SIZE", "_sub_id": "1", "_value": "13", "code": {"text": "size"}},
        {"_type": "SN", "_code_id": "RATIO", "_value": "^1^:^2", "code": {"text": "r"}},
        {"_type": "SN", "_code_id": "LT", "_value": "<^5", "code": {"text": "lt"}},
    ]
    *obs, dr = build_report(out, ReportOptions())
    assert [o["identifier"][0]["value"] for o in obs] == ["F1-SIZE-1", "F1-SIZE-1-2", "F1-RATIO-1", "F1-LT-1"]
    assert obs[2]["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 2}}
    assert obs[3]["valueQuantity"] == {"value": 5, "comparator": "<"}
    assert dr["result"][0] == {"reference": "Observation?identifier=filler|F1-SIZE-1"}
    for o in obs:
        validate_resource(o)


def test_report_without_identifier_is_refused() -> None:
    with pytest.raises(ReportError):
        build_report({"DiagnosticReport": {"identifier": [{"system": "filler"}], "status": "final"}}, ReportOptions())


def test_systems_patient_modes_and_empty_references() -> None:
    dr = {"resourceType": "DiagnosticReport", "identifier": [{"system": "filler", "value": "F1"}],
          "subject": {"type": "Patient", "identifier": {"system": "mrn", "value": "M1"}},
          "basedOn": [{"type": "ServiceRequest", "identifier": {"system": "placer"}}]}
    plan = plan_resources([dr], {"filler": "urn:f", "mrn": "urn:m"}, "create", {"gender": "female"})
    patient, written = plan.entries
    assert patient.create_only and patient.key == "urn:m|M1" and patient.resource["gender"] == "female"
    assert written.key == "urn:f|F1"
    assert written.resource["subject"] == {"reference": "Patient?identifier=urn:m|M1"}
    assert "basedOn" not in written.resource  # no placer number: no reference rather than an empty one
    plan = plan_resources([dr], {}, "identifier")
    assert plan.entries[0].resource["subject"]["identifier"]["system"] == "urn:engine:id:mrn"


def test_validation_text_names_elements_not_values() -> None:
    with pytest.raises(FHIRValidationError) as exc:
        validate_resource({"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"},
                           "issued": "Jane Doe 1980"})
    assert "issued" in str(exc.value) and "Jane" not in str(exc.value)
    with pytest.raises(FHIRValidationError, match="status"):
        validate_resource({"resourceType": "DiagnosticReport", "status": "done", "code": {"text": "x"}})


def test_stale_order_and_retry_after() -> None:
    final = {"status": "final", "issued": "2026-11-25T11:55:00+01:00"}
    corrected = {"status": "corrected", "issued": "2026-11-25T13:00:00+01:00"}
    assert is_older(final, corrected) and not is_older(corrected, final)
    assert is_older({**final, "issued": corrected["issued"]}, corrected)  # same time, not a correction
    assert not is_older({"status": "final"}, corrected)  # cannot tell: applied
    assert retry_after("7") == 7.0 and retry_after(None) is None and retry_after("soon") is None


def test_destination_refuses_an_invalid_report_before_queueing() -> None:
    mapping = load_mapping(ROOT / "mappings" / "oru-to-diagnosticreport.yaml")
    raw = (ROOT / "samples" / "hl7" / "oru_r01.hl7").read_bytes()
    dest = FhirDestination(FhirDestinationConfig(name="emr", type="fhir", base_url="http://127.0.0.1:9/fhir"))
    [out] = mapping.run(Message.parse(raw))
    plan = dest.plan(out)
    assert [e.type for e in plan.entries] == ["Observation", "DiagnosticReport"]
    out["DiagnosticReport"]["status"] = "done"
    with pytest.raises(ProcessingError, match="DiagnosticReport.status"):
        dest.plan(out)
