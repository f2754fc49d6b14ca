"""Modality Performed Procedure Step attribute rules (PS3.4 F.7.2, IHE RAD-6/RAD-7).

What a PPS must hold when created, and what a later N-SET may change; no storage, no network.
Type 1 attributes (present, with a value) are enforced: a missing one is 0x0120, an empty one
0x0121, a wrong PPS Status or start date 0x0106. Type 2 attributes (present, may be empty) are
not worth refusing a modality's work for: a missing one is a warning. An N-SET attribute that
PS3.4 does not let an N-SET change is dropped with a warning.
"""

from __future__ import annotations

import re

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from engine.dicom.status import INVALID_ATTRIBUTE_VALUE, MISSING_ATTRIBUTE, MISSING_ATTRIBUTE_VALUE, DicomRefusal
from engine.errors import REQUIRED_FIELD_MISSING, ProcessingWarning

__all__ = [
    "FINAL",
    "IN_PROGRESS",
    "MPPS_SOP_CLASS",
    "PPS_STATUSES",
    "SETTABLE",
    "check_create",
    "check_set",
    "settable_part",
    "tag_hex",
]

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
PPS_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL = (COMPLETED, DISCONTINUED)
SSAS = "ScheduledStepAttributesSequence"

# PS3.4 table F.7.2-1, N-CREATE column
CREATE_TYPE1 = (
    SSAS,
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)
CREATE_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedProcedureTypeDescription",
    "ProcedureCodeSequence",
    "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime",
    "StudyID",
    "PerformedProtocolCodeSequence",
    "PerformedSeriesSequence",
)
SSAS_TYPE2 = (
    "ReferencedStudySequence",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
    "ScheduledProtocolCodeSequence",
)
# what an N-SET may change (PS3.4 table F.7.2-1, N-SET column; with the dose and billing modules)
SETTABLE = frozenset(
    {
        "SpecificCharacterSet",
        "PerformedProcedureStepStatus",
        "PerformedProcedureStepDescription",
        "PerformedProcedureTypeDescription",
        "ProcedureCodeSequence",
        "PerformedProcedureStepEndDate",
        "PerformedProcedureStepEndTime",
        "CommentsOnThePerformedProcedureStep",
        "PerformedProcedureStepDiscontinuationReasonCodeSequence",
        "PerformedProtocolCodeSequence",
        "PerformedSeriesSequence",
        "AnatomicStructureSpaceOrRegionSequence",
        "TotalTimeOfFluoroscopy",
        "TotalNumberOfExposures",
        "EntranceDose",
        "EntranceDoseInmGy",
        "ExposedArea",
        "DistanceSourceToEntrance",
        "CommentsOnRadiationDose",
        "ExposureDoseSequence",
        "ImageAndFluoroscopyAreaDoseProduct",
        "BillingProcedureStepSequence",
        "FilmConsumptionSequence",
        "BillingSuppliesAndDevicesSequence",
    }
)
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"{tag:08X}" if tag is not None else ""


def _missing(keyword: str, at: str = "") -> DicomRefusal:
    path = f"{at}{keyword}"
    return DicomRefusal(f"{path} missing", MISSING_ATTRIBUTE, path, tags=[tag_hex(keyword)])


def _empty(keyword: str, at: str = "") -> DicomRefusal:
    path = f"{at}{keyword}"
    return DicomRefusal(f"{path} has no value", MISSING_ATTRIBUTE_VALUE, path, tags=[tag_hex(keyword)])


def _invalid(keyword: str, why: str) -> DicomRefusal:
    return DicomRefusal(f"{keyword} {why}", INVALID_ATTRIBUTE_VALUE, keyword, tags=[tag_hex(keyword)])


def _has_value(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    if value is None:
        return False
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
        return len(value) > 0
    return str(value).strip() != ""


def _status(ds: Dataset) -> str:
    return str(ds.get("PerformedProcedureStepStatus", "") or "").strip().upper()


def check_create(ds: Dataset) -> tuple[DicomRefusal | None, list[ProcessingWarning]]:
    """The first reason to refuse an N-CREATE (or None) and the warnings for what may be absent."""
    warnings: list[ProcessingWarning] = []
    for keyword in CREATE_TYPE1:
        if keyword not in ds:
            return _missing(keyword), warnings
        if not _has_value(ds, keyword):
            return _empty(keyword), warnings
    for i, item in enumerate(ds[SSAS].value):
        at = f"{SSAS}[{i}]."
        if "StudyInstanceUID" not in item:
            return _missing("StudyInstanceUID", at), warnings
        if not _has_value(item, "StudyInstanceUID"):
            return _empty("StudyInstanceUID", at), warnings
        for keyword in SSAS_TYPE2:
            if keyword not in item:
                warnings.append(_absent(keyword, at))
    if _status(ds) != IN_PROGRESS:
        return _invalid("PerformedProcedureStepStatus", "must be IN PROGRESS in an N-CREATE"), warnings
    if not _DA.match(str(ds.PerformedProcedureStepStartDate).strip()):
        return _invalid("PerformedProcedureStepStartDate", "is not a DA (YYYYMMDD)"), warnings
    if not _TM.match(str(ds.PerformedProcedureStepStartTime).strip()):
        return _invalid("PerformedProcedureStepStartTime", "is not a TM (HHMMSS)"), warnings
    for keyword in CREATE_TYPE2:
        if keyword not in ds:
            warnings.append(_absent(keyword))
    return None, warnings


def _absent(keyword: str, at: str = "") -> ProcessingWarning:
    path = f"{at}{keyword}"
    return ProcessingWarning(f"{path} (type 2) absent", REQUIRED_FIELD_MISSING, path, target=path)


def check_set(ds: Dataset) -> tuple[DicomRefusal | None, list[ProcessingWarning]]:
    """An N-SET modification list: a wrong PPS Status is refused; attributes an N-SET may not
    change are listed as warnings (and left out by `settable_part`)."""
    warnings: list[ProcessingWarning] = []
    if "PerformedProcedureStepStatus" in ds and _status(ds) not in PPS_STATUSES:
        return _invalid("PerformedProcedureStepStatus", "is not IN PROGRESS, COMPLETED or DISCONTINUED"), warnings
    for elem in ds:
        keyword = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        if keyword not in SETTABLE:
            warnings.append(ProcessingWarning(f"{keyword} may not be changed by N-SET: ignored", location=keyword))
    return None, warnings


def settable_part(ds: Dataset) -> Dataset:
    """Only what an N-SET may change."""
    out = Dataset()
    for elem in ds:
        if elem.keyword in SETTABLE:
            out.add(elem)
    return out
