"""One *source* per medication resource: what reconciliation needs of it, and nothing else.

A source is a plain, JSON-storable dict-like record (`MedSource`) taken from a MedicationRequest,
MedicationDispense, MedicationAdministration or MedicationStatement (R4/R4B; the R5
`medication` CodeableReference is read too). `medicationReference` is resolved to a contained
Medication (`#id`) or to one in the same Bundle (by fullUrl or `Medication/<id>`); a reference
that resolves nowhere is kept as the medication's identity. Dates are kept as sent (the rules
parse them in the configured zone) but checked here, so a malformed date is refused on arrival
with the element named.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from engine.medrec.dates import BadDate, parse_fhir_date

__all__ = [
    "MEDICATION_TYPES",
    "MedSource",
    "SourceError",
    "bundle_medications",
    "extract",
    "extract_all",
    "patient_key",
]

MEDICATION_TYPES = ("MedicationRequest", "MedicationDispense", "MedicationAdministration", "MedicationStatement")

# the dated elements read per type (effective[x] and the fallbacks included; the rules choose)
_DATE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "MedicationRequest": ("authoredOn",),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start", "effectivePeriod.end",
                                 "occurenceDateTime", "occurencePeriod.start", "occurencePeriod.end"),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "effectivePeriod.end", "dateAsserted"),
}
# the same, split once: (element, its steps) per type
_DATE_PATHS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    rtype: tuple((element, tuple(element.split("."))) for element in elements)
    for rtype, elements in _DATE_ELEMENTS.items()
}
# R5 spells MedicationAdministration.effective[x] occurence[x]; read as effective[x]
_R5_ALIASES = {"occurenceDateTime": "effectiveDateTime", "occurencePeriod.start": "effectivePeriod.start",
               "occurencePeriod.end": "effectivePeriod.end"}


class SourceError(ValueError):
    """A resource that cannot be a source; `location` names the element (FHIRPath-like)."""

    def __init__(self, text: str, location: str) -> None:
        super().__init__(text)
        self.text = text
        self.location = location


@dataclass
class MedSource:
    resource_type: str
    id: str
    patient: str  # "Patient/123", or the reference / identifier as sent for an unknown patient
    status: str
    dates: dict[str, str] = field(default_factory=dict)  # element -> value as sent
    codes: list[tuple[str, str]] = field(default_factory=list)  # (system, code), in the order sent
    text: str = ""  # CodeableConcept.text (or Medication.code.text)
    display: str = ""  # what a clinician reads: text, else the first coding display
    reference: str = ""  # medicationReference that resolved nowhere ("" when resolved or absent)
    dose: str = ""  # dosage text
    taken: str = ""  # STU3 MedicationStatement.taken (y | n | unk), still sent by some EMRs
    last_updated: str = ""  # meta.lastUpdated in UTC (ISO 8601, comparable as text); "" when not sent

    @property
    def key(self) -> str:
        return f"{self.resource_type}/{self.id}"

    def as_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies recursively and cost a fifth of a Bundle's time
        return {
            "resource_type": self.resource_type, "id": self.id, "patient": self.patient, "status": self.status,
            "dates": dict(self.dates), "codes": [list(c) for c in self.codes], "text": self.text,
            "display": self.display, "reference": self.reference, "dose": self.dose, "taken": self.taken,
            "last_updated": self.last_updated,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MedSource:
        values = dict(data)
        values["codes"] = [(str(s), str(c)) for s, c in values.get("codes") or []]
        return cls(**values)


def patient_key(reference: str) -> str:
    """`Patient/123` for any spelling of a Patient reference (absolute URL, `_history`); other
    references (urn:uuid, contained) are kept as they are: an unknown patient is keyed by it."""
    ref = reference.strip()
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return f"Patient/{parts[-1]}"
    return ref


def bundle_medications(bundle: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Medication resources of a Bundle by every name a reference may use for them."""
    found: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry") or []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != "Medication":
            continue
        if entry.get("fullUrl"):
            found[str(entry["fullUrl"])] = res
        if res.get("id"):
            found[f"Medication/{res['id']}"] = res
    return found


def bundle_patients(bundle: Mapping[str, Any]) -> dict[str, str]:
    """fullUrl (urn:uuid:...) of each bundled Patient -> `Patient/<id>` when it has an id."""
    found: dict[str, str] = {}
    for entry in bundle.get("entry") or []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(res, dict) and res.get("resourceType") == "Patient" and entry.get("fullUrl") and res.get("id"):
            found[str(entry["fullUrl"])] = f"Patient/{res['id']}"
    return found


def extract_all(resource: Mapping[str, Any]) -> Iterator[tuple[int | None, MedSource]]:
    """Every source in a resource or a Bundle (with its entry index, None for a lone resource);
    other resource types in a Bundle (Patient, Medication ...) are context, not sources."""
    if resource.get("resourceType") != "Bundle":
        if resource.get("resourceType") in MEDICATION_TYPES:
            yield None, extract(resource)
        return
    medications = bundle_medications(resource)
    patients = bundle_patients(resource)
    for index, entry in enumerate(resource.get("entry") or []):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(res, dict) and res.get("resourceType") in MEDICATION_TYPES:
            try:
                yield index, extract(res, medications, patients, full_url=str(entry.get("fullUrl") or ""))
            except SourceError as exc:  # FHIRPath from the Bundle: Bundle.entry[2].resource.whenHandedOver
                element = exc.location.split(".", 1)[1] if "." in exc.location else exc.location
                raise SourceError(exc.text, f"Bundle.entry[{index}].resource.{element}") from None


def extract(
    resource: Mapping[str, Any],
    medications: Mapping[str, dict[str, Any]] | None = None,
    patients: Mapping[str, str] | None = None,
    *,
    full_url: str = "",
) -> MedSource:
    rtype = str(resource.get("resourceType") or "")
    if rtype not in MEDICATION_TYPES:
        raise SourceError(f"{rtype or 'a resource without resourceType'} is not a medication resource", "resourceType")
    rid = str(resource.get("id") or "") or full_url
    if not rid:
        raise SourceError("a medication resource needs an id (or a fullUrl in its Bundle)", "id")
    source = MedSource(rtype, rid, _patient(resource, rtype, patients or {}), str(resource.get("status") or ""))
    for element, steps in _DATE_PATHS[rtype]:
        value: Any = resource
        for step in steps:
            value = value.get(step) if isinstance(value, dict) else None
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise SourceError("not a FHIR date or dateTime", f"{rtype}.{element}")
        try:
            parse_fhir_date(value, UTC)
        except BadDate as exc:
            raise SourceError(str(exc), f"{rtype}.{element}") from None
        source.dates[_R5_ALIASES.get(element, element)] = value
    _medication(source, resource, medications or {})
    source.dose = _dose(resource, rtype)
    taken = resource.get("taken")
    source.taken = str(taken).lower() if isinstance(taken, str) else ""
    source.last_updated = _last_updated(resource)
    return source


# -- the parts (parsed JSON: dicts and lists, so `isinstance(x, dict)`, several times cheaper than Mapping)

def _patient(resource: Mapping[str, Any], rtype: str, patients: Mapping[str, str]) -> str:
    element = "subject" if "subject" in resource else "patient"  # DSTU2/STU3 spelled it `patient`
    subject = resource.get(element)
    if isinstance(subject, dict):
        ref = subject.get("reference")
        if isinstance(ref, str) and ref.strip():
            return patients.get(ref.strip()) or patient_key(ref)
        ident = subject.get("identifier")
        if isinstance(ident, dict) and ident.get("value"):
            return f"identifier:{ident.get('system') or ''}|{ident['value']}"
    raise SourceError("no patient: a medication list belongs to one", f"{rtype}.subject")


def _concept(concept: Any) -> tuple[list[tuple[str, str]], str, str]:
    """(codes, text, first display) of a CodeableConcept."""
    if not isinstance(concept, dict):
        return [], "", ""
    codes: list[tuple[str, str]] = []
    display = ""
    for coding in concept.get("coding") or []:
        if not isinstance(coding, dict):
            continue
        system, code = str(coding.get("system") or "").strip(), str(coding.get("code") or "").strip()
        if code:
            codes.append((system, code))
        if not display and coding.get("display"):
            display = str(coding["display"]).strip()
    return codes, str(concept.get("text") or "").strip(), display


def _medication(source: MedSource, resource: Mapping[str, Any], medications: Mapping[str, dict[str, Any]]) -> None:
    concept = resource.get("medicationCodeableConcept")
    reference = resource.get("medicationReference")
    r5 = resource.get("medication")  # R5 CodeableReference {concept, reference}
    if isinstance(r5, dict):
        concept = concept or r5.get("concept")
        reference = reference or r5.get("reference")
    if concept is None and isinstance(reference, dict):
        ref = str(reference.get("reference") or "").strip()
        medication = _resolve(ref, resource, medications)
        if medication is not None:
            concept = medication.get("code")
        elif ref:
            source.reference = ref
        if not source.display and reference.get("display"):
            source.display = str(reference["display"]).strip()
    codes, text, display = _concept(concept)
    source.codes = codes
    source.text = text
    source.display = text or display or source.display


def _resolve(ref: str, resource: Mapping[str, Any], medications: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    if not ref:
        return None
    if ref.startswith("#"):
        for contained in resource.get("contained") or []:
            if isinstance(contained, dict) and contained.get("id") == ref[1:] and (
                contained.get("resourceType") == "Medication"
            ):
                return contained
        return None
    if ref in medications:
        return medications[ref]
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "Medication":
        return medications.get(f"Medication/{parts[-1]}")
    return None


def _last_updated(resource: Mapping[str, Any]) -> str:
    """meta.lastUpdated as UTC text, so that an older version arriving late can be recognised."""
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str) or not value:
        return ""
    try:
        moment = parse_fhir_date(value, UTC).instant
    except BadDate:
        return ""  # an optional element the adapter validated already; unreadable: ignored
    return moment.astimezone(UTC).isoformat(timespec="microseconds") if moment else ""


def _dose(resource: Mapping[str, Any], rtype: str) -> str:
    if rtype == "MedicationAdministration":
        dosage = resource.get("dosage")
        items = [dosage] if isinstance(dosage, dict) else []
    elif rtype == "MedicationStatement":
        items = resource.get("dosage") or []
    else:
        items = resource.get("dosageInstruction") or []
    for item in items:
        if isinstance(item, dict) and item.get("text"):
            return str(item["text"]).strip()
    return ""
