"""A FHIR R4 ImagingStudy from plain study data (what the PACS holds plus what the MPPS said).

Nothing here knows DICOM networking: the runtime turns the PACS's answer and the study payload
into `StudyData`; this module only decides the resource. Identifier systems are *names*
(`accession`, `mrn`, `placer`, `filler`) that the destination resolves with its
`identifier_systems`, as the FHIR destination's mappings do; the study UID is
`urn:dicom:uid|urn:oid:<uid>` and is the conditional key, so the same study always updates the
same resource. Values the resource cannot carry (an instance without SOP class) are dropped and
reported as warnings, never a refusal: an ImagingStudy with one instance short beats none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

__all__ = ["DCM", "InstanceData", "SeriesData", "StudyData", "build_imaging_study", "dicom_datetime", "pn_text"]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
UID_SYSTEM = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"

# DICOM Laterality (0020,0060) -> SNOMED CT (PS3.16 CID 244)
LATERALITY = {"R": ("24028007", "Right"), "L": ("7771000", "Left"), "B": ("51440002", "Right and left")}
# Body Part Examined (0018,0015) defined terms -> SNOMED CT (PS3.16 annex L), the ones seen every day;
# another term is kept as text (display) rather than dropped
BODY_PART = {
    "ABDOMEN": ("818981001", "Abdomen"), "ANKLE": ("344001", "Ankle"), "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"), "CHEST": ("816094009", "Thorax"), "CSPINE": ("122494005", "Cervical spine"),
    "ELBOW": ("127949000", "Elbow"), "EXTREMITY": ("66019005", "Limb"), "FOOT": ("56459004", "Foot"),
    "HAND": ("85562004", "Hand"), "HEAD": ("69536005", "Head"), "HEART": ("80891009", "Heart"),
    "HIP": ("29836001", "Hip"), "KNEE": ("72696002", "Knee"), "LSPINE": ("122496007", "Lumbar spine"),
    "NECK": ("45048000", "Neck"), "PELVIS": ("816092008", "Pelvis"), "SHOULDER": ("16982005", "Shoulder"),
    "SKULL": ("89546000", "Skull"), "TSPINE": ("122495006", "Thoracic spine"), "WRIST": ("74670003", "Wrist"),
}


@dataclass
class InstanceData:
    uid: str
    sop_class: str = ""
    number: int | None = None
    title: str = ""


@dataclass
class SeriesData:
    uid: str
    modality: str = ""
    number: int | None = None
    description: str = ""
    body_part: str = ""
    laterality: str = ""
    started: str = ""  # DICOM date + time, "YYYYMMDD[HHMMSS[.f]]"
    performers: list[str] = field(default_factory=list)  # DICOM PN text
    instances: list[InstanceData] = field(default_factory=list)


@dataclass
class StudyData:
    uid: str
    patient_id: str
    accession: str = ""
    patient_name: str = ""  # DICOM PN text
    started: str = ""
    description: str = ""
    referrer: str = ""  # DICOM PN text
    placer: str = ""
    filler: str = ""
    modalities: list[str] = field(default_factory=list)  # ModalitiesInStudy; the series' are added
    procedure_codes: list[dict[str, str]] = field(default_factory=list)  # {code, system, display}
    series: list[SeriesData] = field(default_factory=list)


def pn_text(pn: str) -> str:
    """'Family^Given^Middle^Prefix^Suffix' as a person would read it ('Given Middle Family')."""
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


def human_name(pn: str) -> dict[str, Any]:
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle = (p.strip() for p in parts[:3])
    name: dict[str, Any] = {"text": pn_text(pn)}
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [g for g in (given, middle) if g]
    return name


def dicom_datetime(value: str, tz: ZoneInfo) -> str:
    """DICOM DA+TM ('20261201101500.123') -> FHIR dateTime; a time needs a zone, the site's is used."""
    digits = value.strip().split(".")[0]
    if len(digits) < 8 or not digits.isdigit():
        return ""
    try:
        if len(digits) < 12:
            return datetime.strptime(digits[:8], "%Y%m%d").date().isoformat()
        stamp = datetime.strptime(digits[:14].ljust(14, "0"), "%Y%m%d%H%M%S").replace(tzinfo=tz)
    except ValueError:
        return ""
    return stamp.isoformat()


def _coding(system: str, code: str, display: str = "") -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def _series(s: SeriesData, tz: ZoneInfo, warnings: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"uid": s.uid}
    if s.number is not None:
        out["number"] = s.number
    out["modality"] = _coding(DCM, s.modality or "OT")
    if not s.modality:
        warnings.append(f"series {s.uid}: no Modality, written as OT")
    if s.description:
        out["description"] = s.description
    out["numberOfInstances"] = len(s.instances)
    if s.body_part:
        code = BODY_PART.get(s.body_part.upper())
        out["bodySite"] = _coding(SCT, *code) if code else {"display": s.body_part}
    if s.laterality.upper() in LATERALITY:
        out["laterality"] = _coding(SCT, *LATERALITY[s.laterality.upper()])
    started = dicom_datetime(s.started, tz) if s.started else ""
    if started:
        out["started"] = started
    if s.performers:
        out["performer"] = [{"actor": {"display": pn_text(p)}} for p in s.performers if pn_text(p)]
    instances = []
    for i in s.instances:
        if not i.sop_class:
            warnings.append(f"instance {i.uid}: no SOPClassUID, left out")
            continue
        one: dict[str, Any] = {"uid": i.uid, "sopClass": _coding(URI_SYSTEM, f"urn:oid:{i.sop_class}")}
        if i.number is not None:
            one["number"] = i.number
        if i.title:
            one["title"] = i.title
        instances.append(one)
    if instances:
        out["instance"] = instances
    out["numberOfInstances"] = len(instances)
    return {k: v for k, v in out.items() if v not in ("", [], None)}


def endpoint(url: str) -> dict[str, Any]:
    """The PACS's WADO-RS base as an Endpoint, contained in the ImagingStudy: a shared Endpoint written
    by every delivery would race itself into duplicates (and then every conditional update is a 412)."""
    return {
        "resourceType": "Endpoint",
        "id": "wadors",
        "identifier": [{"system": URI_SYSTEM, "value": url}],
        "status": "active",
        "connectionType": _coding("http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "dicom-wado-rs"),
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": url,
    }


def build_imaging_study(
    study: StudyData, *, tz: ZoneInfo, wadors_url: str = ""
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """([the ImagingStudy], the Patient for `patient: create`, warnings)."""
    warnings: list[str] = []
    identifiers: list[dict[str, Any]] = [{"system": UID_SYSTEM, "value": f"urn:oid:{study.uid}"}]
    if study.accession:
        identifiers.append({"use": "usual", "type": {"coding": [_coding(V2_0203, "ACSN")]},
                            "system": "accession", "value": study.accession})
    subject = {"type": "Patient", "identifier": {"system": "mrn", "value": study.patient_id}}
    resource: dict[str, Any] = {"resourceType": "ImagingStudy", "identifier": identifiers, "status": "available"}
    modalities = list(dict.fromkeys([*study.modalities, *(s.modality for s in study.series if s.modality)]))
    if modalities:
        resource["modality"] = [_coding(DCM, m) for m in modalities]
    resource["subject"] = subject
    started = dicom_datetime(study.started, tz) if study.started else ""
    if started:
        resource["started"] = started
    order = next(((name, value) for name, value in (("placer", study.placer), ("filler", study.filler),
                                                   ("accession", study.accession)) if value), None)
    if order is not None:
        resource["basedOn"] = [{"type": "ServiceRequest", "identifier": {"system": order[0], "value": order[1]}}]
    if pn_text(study.referrer):
        resource["referrer"] = {"display": pn_text(study.referrer)}
    if wadors_url:
        resource["contained"] = [endpoint(wadors_url)]
        resource["endpoint"] = [{"reference": "#wadors"}]
    series = [_series(s, tz, warnings) for s in study.series]
    resource["numberOfSeries"] = len(series)
    resource["numberOfInstances"] = sum(s["numberOfInstances"] for s in series)
    codes = [c for c in study.procedure_codes if c.get("code")]
    if codes:
        resource["procedureCode"] = [
            {"coding": [_coding(c.get("system") or "urn:engine:id:procedure", c["code"], c.get("display", ""))],
             **({"text": c["display"]} if c.get("display") else {})}
            for c in codes
        ]
    if study.description:
        resource["description"] = study.description
    if series:
        resource["series"] = series
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": [subject["identifier"]]}
    if pn_text(study.patient_name):
        patient["name"] = [human_name(study.patient_name)]
    return [resource], patient, warnings
