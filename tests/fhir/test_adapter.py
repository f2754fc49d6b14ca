"""The `fhir` input adapter on its own: identity, the view (C5), validation locations, split and
combine, and answers that hold no resource content."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.errors import ProcessingError
from engine.fhir.adapter import FHIRAdapter, FHIROptions, FHIRView, read_answer
from engine.inputs import Outcome


def adapter() -> FHIRAdapter:
    return FHIRAdapter(FHIROptions())


def statement(sid: str = "s1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationStatement", "id": sid, "status": "active",
            "subject": {"reference": "Patient/p1"},
            "medicationCodeableConcept": {"coding": [{"system": "urn:x", "code": "1"}, {"code": "2"}]}, **extra}


def raw(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource).encode()


def refusal(resource: dict[str, Any]) -> ProcessingError:
    a = adapter()
    unit = a.parse(raw(resource))
    with pytest.raises(ProcessingError) as info:
        a.check(unit)
    return info.value


def test_identity_and_view() -> None:
    unit = adapter().parse(raw(statement()))
    assert unit.message_type == "MedicationStatement" and unit.patient_id == "Patient/p1"
    assert unit.control_id.startswith("MedicationStatement/s1#")
    assert adapter().parse(raw(statement())).control_id == unit.control_id  # same content, same id
    assert adapter().parse(raw(statement(status="stopped"))).control_id != unit.control_id
    view = unit.view
    assert isinstance(view, FHIRView) and view.resource["id"] == "s1"
    assert view.get("subject.reference") == "Patient/p1"
    assert view.get("medicationCodeableConcept.coding.code") == "1"  # a list gives its first item
    assert view.get("medicationCodeableConcept.coding.1.code") == "2"
    assert view.get("medicationCodeableConcept") == "" and view.get("nosuch.path") == ""
    assert "Patient" not in repr(view)


def test_validation_names_the_element() -> None:
    err = refusal(statement(effectiveDateTime="2026-02-30T25:00"))
    assert err.location == "MedicationStatement.effectiveDateTime"
    answer = read_answer(adapter().answer(adapter().parse(raw(statement())))("error", err, []))
    assert answer.status == 422 and answer.body is not None
    assert answer.body["issue"][0]["expression"] == ["MedicationStatement.effectiveDateTime"]
    err = refusal(statement(dosage=[{"timing": {"repeat": {"frequency": "often"}}}]))
    assert err.location == "MedicationStatement.dosage[0].timing.repeat.frequency"
    err = refusal(statement(status="taking"))
    assert err.location == "MedicationStatement.status"


def test_transaction_entries_are_validated_each_once_with_their_place() -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": statement("a"), "request": {"method": "PUT", "url": "MedicationStatement/a"}},
        {"resource": {"resourceType": "Nonsense"}, "request": {"method": "POST", "url": "Nonsense"}},
    ]}
    err = refusal(bundle)
    assert err.location == "Bundle.entry[1].resource.resourceType"
    bundle["entry"][1] = {"resource": statement("b", status="nope"), "request": {"method": "PUT", "url": "x"}}
    assert refusal(bundle).location == "Bundle.entry[1].resource.status"
    bundle["entry"][1] = {"request": {"method": "DELETE", "url": "MedicationStatement/c"}, "fullUrl": 5}
    assert refusal(bundle).location.startswith("Bundle.entry[1].fullUrl")
    bundle["entry"][1] = {"resource": statement("b"), "request": {"method": "PUT", "url": "MedicationStatement/b"}}
    a = adapter()
    unit = a.parse(raw(bundle))
    a.check(unit)
    assert unit.message_type == "Bundle" and unit.patient_id == "Patient/p1"
    answer = read_answer(a.answer(unit)("processed", None, []))
    assert answer.status == 200 and answer.body is not None
    assert [e["response"]["location"] for e in answer.body["entry"]] == ["MedicationStatement/a",
                                                                         "MedicationStatement/b"]


def test_batch_split_and_combine() -> None:
    a = adapter()
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": statement("a")}, {"request": {}}]}
    parts = a.split(raw(batch))
    assert parts is not None and len(parts) == 2
    assert json.loads(parts[0])["id"] == "a"
    with pytest.raises(ProcessingError):  # the entry without a resource is stored and refused
        a.parse(parts[1])
    assert a.split(raw(statement())) is None and a.split(b"not json but batch") is None
    ok = a.answer(a.parse(parts[0]))("processed", None, [])
    bad, _ = a.refusal(parts[1])
    outcomes = [Outcome("processed", 1, answer=ok),
                Outcome("error", 2, answer=bad("error", ProcessingError("x", 101, "resourceType"), []))]
    combined = read_answer(a.combine(outcomes))
    assert combined.status == 200 and combined.body is not None
    assert combined.body["type"] == "batch-response"
    assert [e["response"]["status"] for e in combined.body["entry"]] == ["201 Created", "422 Unprocessable Entity"]
    assert "Patient" not in ok and "p1" not in ok  # the stored answer holds no content


def test_unknown_elements_are_warnings_unless_refused() -> None:
    a = adapter()
    body = statement(renderedDosageInstruction="twice a day", dosage=[{"text": "2x", "sequenceX": 1}])
    unit = a.parse(raw(body))
    a.check(unit)  # accepted
    assert sorted(w.location for w in unit.warnings) == ["MedicationStatement.dosage[0].sequenceX",
                                                         "MedicationStatement.renderedDosageInstruction"]
    assert "twice" not in " ".join(str(w) for w in unit.warnings)
    assert isinstance(unit.view, FHIRView) and unit.view.resource["renderedDosageInstruction"] == "twice a day"
    answer = read_answer(a.answer(unit)("processed", None, unit.warnings))
    assert answer.status == 201 and [i["severity"] for i in answer.warnings] == ["warning", "warning"]
    mixed = statement(renderedDosageInstruction="x", effectiveDateTime="not a date")
    assert refusal(mixed).location == "MedicationStatement.effectiveDateTime"  # a real error still refuses
    strict = FHIRAdapter(FHIROptions(unknown_elements="refuse"))
    unit = strict.parse(raw(statement(renderedDosageInstruction="x")))
    with pytest.raises(ProcessingError) as info:
        strict.check(unit)
    assert info.value.location == "MedicationStatement.renderedDosageInstruction"
