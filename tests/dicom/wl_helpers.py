"""Helpers shared by the worklist tests (imported by name: conftest puts this folder on sys.path)."""

from __future__ import annotations

import copy
from typing import Any

BASE_ITEM: dict[str, Any] = {
    "SpecificCharacterSet": "ISO_IR 192",
    "PatientID": "P1",
    "IssuerOfPatientID": "HOSP",
    "PatientName": "Doe^John^^^",
    "PatientBirthDate": "19700101",
    "PatientSex": "M",
    "ReferringPhysicianName": "Ref^Rita",
    "AdmissionID": "",
    "PlacerOrderNumberImagingServiceRequest": "PL1",
    "FillerOrderNumberImagingServiceRequest": "FI1",
    "RequestedProcedurePriority": "ROUTINE",
    "AccessionNumber": "ACC1",
    "RequestedProcedureID": "RP1",
    "StudyInstanceUID": "1.2.826.0.1.3680043.10.1.1",
    "RequestedProcedureDescription": "CT HEAD",
    "RequestedProcedureCodeSequence": [
        {"CodeValue": "CTH", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "CT head"}
    ],
    "RequestingPhysician": "Req^Rob",
    "ReasonForTheRequestedProcedure": "",
    "ScheduledProcedureStepSequence": [
        {
            "ScheduledStationAETitle": "CT1",
            "ScheduledProcedureStepStartDate": "20261125",
            "ScheduledProcedureStepStartTime": "093000",
            "Modality": "CT",
            "ScheduledPerformingPhysicianName": "",
            "ScheduledProcedureStepDescription": "CT HEAD",
            "ScheduledProtocolCodeSequence": [
                {"CodeValue": "P1", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "Protocol 1"}
            ],
            "ScheduledProcedureStepID": "SPS1",
            "ScheduledProcedureStepLocation": "Room 1",
            "ScheduledStationName": "CT ROOM 1",
        }
    ],
}


def make_item(sps: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A contract-shaped worklist dataset with overrides (top-level keys; `sps` for the step)."""
    item = copy.deepcopy(BASE_ITEM)
    item.update(top)
    if sps:
        item["ScheduledProcedureStepSequence"][0].update(sps)
    return item
