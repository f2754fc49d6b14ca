"""The reconciled list as a FHIR R4 `List` (LOINC 10160-0 "History of Medication use", mode
`working`, status `current`): one contained MedicationStatement per record, its sources as
`derivedFrom`, and `emptyReason` when there is nothing on it.

The contained statement's status is the winning source's status when it is a
MedicationStatement status code, else `unknown`; its note says which source won and with what
status, so nothing is silently re-interpreted.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from engine.fhir.models import validate_resource
from engine.medrec.reconcile import MedRecord, Reconciliation

__all__ = ["LIST_CODE", "build_list", "subject_of"]

LIST_CODE = {"system": "http://loinc.org", "code": "10160-0", "display": "History of Medication use Narrative"}
EMPTY_REASON = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "nilknown",
                "display": "Nil Known"}],
    "text": "no medication within the look-back window",
}
STATEMENT_STATUSES = frozenset(
    {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"}
)


def subject_of(patient: str) -> dict[str, Any]:
    """The Reference a patient key stands for (`identifier:<system>|<value>` for one sent by identifier)."""
    if patient.startswith("identifier:"):
        system, _, value = patient[len("identifier:"):].partition("|")
        ident = {"value": value} | ({"system": system} if system else {})
        return {"identifier": ident}
    return {"reference": patient}


def _reference(rtype: str, rid: str) -> str:
    return rid if ":" in rid else f"{rtype}/{rid}"  # an id taken from a urn:uuid fullUrl stays as it is


def _statement(record: MedRecord, index: int, subject: dict[str, Any]) -> dict[str, Any]:
    if record.codes or record.display:
        coding = [{"system": s, "code": c} if s else {"code": c} for s, c in record.codes]
        medication: dict[str, Any] = {"medicationCodeableConcept": {
            **({"coding": coding} if coding else {}), **({"text": record.display} if record.display else {})}}
    elif record.key.startswith("reference:"):
        medication = {"medicationReference": {"reference": record.key[len("reference:"):]}}
    else:
        medication = {"medicationCodeableConcept": {"text": "medication not stated (no code or reference sent)"}}
    winner_type, _, _ = record.winner.partition("/")
    statement: dict[str, Any] = {
        "resourceType": "MedicationStatement",
        "id": f"med{index}",
        "status": record.status if record.status in STATEMENT_STATUSES else "unknown",
        **medication,
        "subject": subject,
        "derivedFrom": [{"reference": _reference(s["type"], s["id"])} for s in record.sources],
        "note": [{"text": f"{winner_type} {record.status or '(no status)'}; "
                          f"{len(record.sources)} source(s); key {record.key}"}],
    }
    if record.date is not None:
        statement["effectiveDateTime"] = record.date.isoformat()
    if record.dose:
        statement["dosage"] = [{"text": record.dose}]
    return statement


def build_list(result: Reconciliation, *, now: datetime | None = None, validate: bool = True) -> dict[str, Any]:
    subject = subject_of(result.patient)
    lst: dict[str, Any] = {
        "resourceType": "List",
        "status": "current",
        "mode": "working",
        "title": f"Medication list as of {result.day.isoformat()}",
        "code": {"coding": [LIST_CODE]},
        "subject": subject,
        "date": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
    }
    statements = [_statement(r, i, subject) for i, r in enumerate(result.records, start=1)]
    if statements:
        lst["contained"] = statements
        lst["entry"] = [{"item": {"reference": f"#{s['id']}"}} for s in statements]
    else:
        lst["emptyReason"] = EMPTY_REASON
    if validate:
        validate_resource(lst, "R4B")
    return lst
