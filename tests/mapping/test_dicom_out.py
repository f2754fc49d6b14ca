"""Outputs as pydicom Datasets and readable dumps."""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset

from engine.mapping import render, to_dataset


def test_to_dataset_keywords_sequences_and_empty_values():
    ds = to_dataset(
        {
            "PatientName": "Doe^Jane",
            "PatientID": "1",
            "PatientBirthDate": "",
            "ScheduledProcedureStepSequence": [
                {
                    "Modality": "CT",
                    "ScheduledProtocolCodeSequence": [
                        {"CodeValue": "X", "CodingSchemeDesignator": "L", "CodeMeaning": "x"}
                    ],
                }
            ],
            "RequestedProcedureCodeSequence": [],
            "ReferencedStudySequence": "",
            "OtherPatientIDs": ["A", "B"],
        }
    )
    assert isinstance(ds, Dataset)
    assert ds.PatientName == "Doe^Jane" and ds["PatientName"].VR == "PN"
    assert ds["PatientBirthDate"].VR == "DA" and ds.PatientBirthDate in ("", None)
    sps = ds.ScheduledProcedureStepSequence
    assert len(sps) == 1 and sps[0].Modality == "CT"
    assert sps[0].ScheduledProtocolCodeSequence[0].CodeValue == "X"
    assert len(ds.RequestedProcedureCodeSequence) == 0 and len(ds.ReferencedStudySequence) == 0
    assert list(ds.OtherPatientIDs) == ["A", "B"]


def test_to_dataset_rejects_unknown_keywords_and_shapes():
    with pytest.raises(ValueError, match="PatientsName"):
        to_dataset({"PatientsName": "x"})
    with pytest.raises(ValueError):
        to_dataset({"PatientID": {"a": 1}})
    with pytest.raises(ValueError):
        to_dataset({"ScheduledProcedureStepSequence": "CT"})


def test_to_dataset_validate_raises_on_bad_values():
    to_dataset({"Modality": "x" * 40})  # rendering never fails on a bad value
    with pytest.raises(ValueError):
        to_dataset({"Modality": "x" * 40}, validate=True)


def test_render_dicom_and_json():
    outputs = [{"control": {"order_control": "NW"}, "dataset": {"PatientID": "1", "Modality": "CT"}}]
    text = render(outputs, "dicom")
    assert "output 1 of 1" in text and '"order_control": "NW"' in text
    assert "(0010,0020) Patient ID" in text and "'1'" in text
    assert json.loads(render([{"a": "ü"}], "fhir")) == [{"a": "ü"}]
    assert "ü" in render([{"a": "ü"}], "json")
    assert render([], "dicom") == "(no output)"
