"""Builders for medication resources in the tests (dates relative to a fixed day)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
NDC = "http://hl7.org/fhir/sid/ndc"
TODAY = date(2026, 6, 15)
PATIENT = "Patient/p1"

# real RxNorm pairs (from the shipped table): atorvastatin 10 MG Oral Tablet and its brand
ATORVA_10 = "617312"
LIPITOR_10 = "617314"
AMLODIPINE_5 = "197361"
AMLODIPINE_10 = "308135"


def ago(days: int) -> str:
    return (TODAY - timedelta(days=days)).isoformat()


def med(code: str | None = None, system: str = RXNORM, text: str = "") -> dict[str, Any]:
    concept: dict[str, Any] = {}
    if code:
        concept["coding"] = [{"system": system, "code": code, "display": f"drug {code}"}]
    if text:
        concept["text"] = text
    return {"medicationCodeableConcept": concept}


def request(rid: str, status: str = "completed", authored: str | None = None, code: str | None = ATORVA_10,
            **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationRequest", "id": rid, "status": status, "intent": "order",
                           "subject": {"reference": PATIENT}, **(med(code) if code else {})}
    if authored:
        res["authoredOn"] = authored
    res.update(extra)
    return res


def dispense(rid: str, handed: str | None, code: str | None = ATORVA_10, status: str = "completed",
             **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationDispense", "id": rid, "status": status,
                           "subject": {"reference": PATIENT}, **(med(code) if code else {})}
    if handed:
        res["whenHandedOver"] = handed
    res.update(extra)
    return res


def administration(rid: str, when: str, code: str | None = ATORVA_10, status: str = "completed") -> dict[str, Any]:
    return {"resourceType": "MedicationAdministration", "id": rid, "status": status,
            "subject": {"reference": PATIENT}, "effectiveDateTime": when, **(med(code) if code else {})}


def statement(rid: str, status: str = "completed", code: str | None = ATORVA_10, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationStatement", "id": rid, "status": status,
            "subject": {"reference": PATIENT}, **(med(code) if code else {}), **extra}


def bundle(*resources: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    entries = []
    for res in resources:
        entry: dict[str, Any] = {"resource": res}
        if kind in ("transaction", "batch"):
            entry["request"] = {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}
