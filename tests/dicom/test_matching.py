"""PS3.4 C.2.2.2 matching rules, one by one, on contract-shaped items."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from pydicom.dataset import Dataset
from wl_helpers import make_item

from engine.dicom.dataset import build_response, dataset_to_item, item_to_dataset
from engine.dicom.matching import MalformedQuery, compile_query, matches


def ident(sps: dict[str, Any] | None = None, **top: Any) -> Dataset:
    ds = Dataset()
    for k, v in top.items():
        if isinstance(v, list):
            items = []
            for sub in v:
                d = Dataset()
                for sk, sv in sub.items():
                    setattr(d, sk, sv)
                items.append(d)
            setattr(ds, k, items)
        else:
            setattr(ds, k, v)
    if sps is not None:
        step = Dataset()
        for k, v in sps.items():
            setattr(step, k, v)
        ds.ScheduledProcedureStepSequence = [step]
    return ds


def hit(query: Dataset, item: dict[str, Any]) -> bool:
    return matches(compile_query(query), item)


ITEM = make_item()


def test_universal_matching_on_empty_keys() -> None:
    assert hit(ident(PatientName="", PatientID="", AccessionNumber=""), ITEM)
    assert hit(ident(PatientID="*"), ITEM)


def test_single_value() -> None:
    assert hit(ident(PatientID="P1"), ITEM)
    assert not hit(ident(PatientID="P2"), ITEM)
    assert not hit(ident(PatientID="P"), ITEM)
    assert hit(ident(AccessionNumber="ACC1"), ITEM)


def test_single_value_is_case_sensitive_outside_pn() -> None:
    assert not hit(ident(AccessionNumber="acc1"), ITEM)


def test_zero_length_stored_value_fails_non_universal_match() -> None:
    item = make_item(AdmissionID="")
    assert not hit(ident(AdmissionID="ADM1"), item)
    assert not hit(ident(AdmissionID="*A*"), item)
    assert hit(ident(AdmissionID=""), item)
    missing = make_item()
    del missing["AccessionNumber"]
    assert not hit(ident(AccessionNumber="ACC1"), missing)
    assert not hit(ident(AccessionNumber="?*"), missing)


def test_wildcards_star_and_question_mark() -> None:
    assert hit(ident(AccessionNumber="AC*"), ITEM)
    assert hit(ident(AccessionNumber="*C1"), ITEM)
    assert hit(ident(AccessionNumber="A?C1"), ITEM)
    assert not hit(ident(AccessionNumber="A?1"), ITEM)
    assert hit(ident(AccessionNumber="A*1"), ITEM)
    assert not hit(ident(AccessionNumber="B*"), ITEM)


def test_wildcard_regex_characters_are_literal() -> None:
    item = make_item(AccessionNumber="A.1(2)")
    assert hit(ident(AccessionNumber="A.1(*"), item)
    assert not hit(ident(AccessionNumber="AX1(*"), item)


def test_patient_name_is_case_insensitive_with_wildcards() -> None:
    assert hit(ident(PatientName="doe*"), ITEM)
    assert hit(ident(PatientName="DOE^JOHN"), ITEM)  # trailing empty components ignored
    assert hit(ident(PatientName="d?e^j*"), ITEM)
    assert not hit(ident(PatientName="smith*"), ITEM)


def test_patient_name_non_ascii_case_insensitive() -> None:
    item = make_item(PatientName="Müller^Jürgen")
    assert hit(ident(PatientName="MÜLLER*", SpecificCharacterSet="ISO_IR 192"), item)
    assert hit(ident(PatientName="müller^jürgen", SpecificCharacterSet="ISO_IR 192"), item)
    assert not hit(ident(PatientName="MULLER*"), item)


def test_patient_name_first_component_group() -> None:
    item = make_item(PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert hit(ident(PatientName="YAMADA^TAROU"), item)
    assert hit(ident(PatientName="yamada*"), item)


def test_date_single_and_ranges() -> None:
    assert hit(ident(sps={"ScheduledProcedureStepStartDate": "20261125"}), ITEM)
    assert not hit(ident(sps={"ScheduledProcedureStepStartDate": "20261126"}), ITEM)
    assert hit(ident(sps={"ScheduledProcedureStepStartDate": "20261125-"}), ITEM)
    assert not hit(ident(sps={"ScheduledProcedureStepStartDate": "20261126-"}), ITEM)
    assert hit(ident(sps={"ScheduledProcedureStepStartDate": "-20261130"}), ITEM)
    assert not hit(ident(sps={"ScheduledProcedureStepStartDate": "-20261124"}), ITEM)
    assert hit(ident(sps={"ScheduledProcedureStepStartDate": "20261101-20261130"}), ITEM)
    assert not hit(ident(sps={"ScheduledProcedureStepStartDate": "20261201-20261231"}), ITEM)


def test_time_ranges() -> None:
    assert hit(ident(sps={"ScheduledProcedureStepStartTime": "0900-1000"}), ITEM)
    assert not hit(ident(sps={"ScheduledProcedureStepStartTime": "1000-"}), ITEM)
    assert hit(ident(sps={"ScheduledProcedureStepStartTime": "-0930"}), ITEM)  # upper bound inclusive
    assert hit(ident(sps={"ScheduledProcedureStepStartTime": "0930"}), ITEM)


def test_combined_date_time_range_is_one_period() -> None:
    # from 25 Nov 10:00 to 27 Nov 08:00: an item on 26 Nov at 15:00 matches although 15:00 is
    # outside 10:00-08:00 taken independently; one on 25 Nov at 09:30 does not.
    period = {"ScheduledProcedureStepStartDate": "20261125-20261127", "ScheduledProcedureStepStartTime": "1000-0800"}
    mid = make_item(sps={"ScheduledProcedureStepStartDate": "20261126", "ScheduledProcedureStepStartTime": "150000"})
    early = make_item(sps={"ScheduledProcedureStepStartDate": "20261125", "ScheduledProcedureStepStartTime": "093000"})
    late = make_item(sps={"ScheduledProcedureStepStartDate": "20261127", "ScheduledProcedureStepStartTime": "090000"})
    first_day = make_item(
        sps={"ScheduledProcedureStepStartDate": "20261125", "ScheduledProcedureStepStartTime": "2300"}
    )
    assert hit(ident(sps=period), mid)
    assert not hit(ident(sps=period), early)
    assert not hit(ident(sps=period), late)
    assert hit(ident(sps=period), first_day)


def test_combined_range_with_open_ends_and_single_date() -> None:
    item = make_item(sps={"ScheduledProcedureStepStartDate": "20261126", "ScheduledProcedureStepStartTime": "070000"})
    assert hit(
        ident(sps={"ScheduledProcedureStepStartDate": "20261125-", "ScheduledProcedureStepStartTime": "0800-"}), item
    )
    assert not hit(
        ident(sps={"ScheduledProcedureStepStartDate": "20261126", "ScheduledProcedureStepStartTime": "0800-"}), item
    )


def test_time_range_fails_on_zero_length_stored_time() -> None:
    item = make_item(sps={"ScheduledProcedureStepStartTime": ""})
    q = {"ScheduledProcedureStepStartDate": "20261125-", "ScheduledProcedureStepStartTime": "0800-"}
    assert not hit(ident(sps=q), item)
    assert hit(ident(sps={"ScheduledProcedureStepStartDate": "20261125-", "ScheduledProcedureStepStartTime": ""}), item)


def test_uid_list() -> None:
    uid = ITEM["StudyInstanceUID"]
    assert hit(ident(StudyInstanceUID=f"1.2.3\\{uid}"), ITEM)
    assert hit(ident(StudyInstanceUID=uid), ITEM)
    assert not hit(ident(StudyInstanceUID="1.2.3\\1.2.4"), ITEM)


def test_sequence_matching_inside_sps() -> None:
    assert hit(ident(sps={"Modality": "CT", "ScheduledStationAETitle": "CT1"}), ITEM)
    assert not hit(ident(sps={"Modality": "MR", "ScheduledStationAETitle": "CT1"}), ITEM)
    assert not hit(ident(sps={"Modality": "CT", "ScheduledStationAETitle": "CT2"}), ITEM)


def test_nested_code_sequence_matching() -> None:
    q = ident(RequestedProcedureCodeSequence=[{"CodeValue": "CTH"}])
    assert hit(q, ITEM)
    assert not hit(ident(RequestedProcedureCodeSequence=[{"CodeValue": "MRH"}]), ITEM)
    assert not hit(ident(ReferencedStudySequence=[{"ReferencedSOPInstanceUID": "1.2"}]), ITEM)


def test_empty_sequence_and_empty_item_match_anything() -> None:
    q = Dataset()
    q.ScheduledProcedureStepSequence = [Dataset()]
    assert hit(q, ITEM)
    q2 = Dataset()
    q2.ScheduledProcedureStepSequence = []
    assert hit(q2, ITEM)
    # an empty protocol code item (ultrasound habit) matches an item without protocol codes
    no_codes = make_item(sps={"ScheduledProtocolCodeSequence": []})
    q3 = ident(sps={"Modality": "CT"})
    q3.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence = [Dataset()]
    assert hit(q3, no_codes)


def test_top_level_sps_keys_match_the_sps_item() -> None:
    assert hit(ident(Modality="CT", ScheduledStationAETitle="CT1"), ITEM)
    assert not hit(ident(Modality="MR"), ITEM)
    assert not hit(ident(ScheduledStationAETitle="CT9"), ITEM)
    # a top-level key and a sequence key must hold on the same step
    assert not hit(ident(Modality="MR", sps={"ScheduledStationAETitle": "CT1"}), ITEM)


@pytest.mark.parametrize(
    "key,value",
    [
        ("ScheduledProcedureStepStartDate", "2026-11-25"),
        ("ScheduledProcedureStepStartDate", "tomorrow"),
        ("ScheduledProcedureStepStartDate", "20261125-20261130-20261201"),
        ("ScheduledProcedureStepStartTime", "9am"),
    ],
)
def test_malformed_values_raise(key: str, value: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid value while we build it
        query = ident(sps={key: value})
    with pytest.raises(MalformedQuery):
        compile_query(query)


def test_response_returns_every_query_key() -> None:
    q = ident(
        PatientName="",
        PatientID="",
        AdmissionID="",
        PatientWeight=None,
        sps={"Modality": "", "ScheduledPerformingPhysicianName": "", "ScheduledProcedureStepStatus": ""},
    )
    out = build_response(q, ITEM, steps=ITEM["ScheduledProcedureStepSequence"])
    assert str(out.PatientName) == "Doe^John^^^"
    assert out.PatientID == "P1"
    assert "AdmissionID" in out and out.AdmissionID == ""
    assert "PatientWeight" in out and out.PatientWeight is None
    step = out.ScheduledProcedureStepSequence[0]
    assert step.Modality == "CT"
    assert set(step.dir()) == {"Modality", "ScheduledPerformingPhysicianName", "ScheduledProcedureStepStatus"}
    assert "AccessionNumber" not in out
    assert out.SpecificCharacterSet == ""


def test_response_charset_follows_the_text() -> None:
    item = make_item(PatientName="Müller^Jürgen")
    out = build_response(ident(PatientName=""), item)
    assert out.SpecificCharacterSet == "ISO_IR 192"
    latin = build_response(ident(PatientName="", SpecificCharacterSet="ISO_IR 100"), item)
    assert latin.SpecificCharacterSet == "ISO_IR 100"
    greek = build_response(
        ident(PatientName="", SpecificCharacterSet="ISO_IR 100"), make_item(PatientName="Παπαδόπουλος")
    )
    assert greek.SpecificCharacterSet == "ISO_IR 192"


def test_item_dataset_round_trip() -> None:
    ds = item_to_dataset(ITEM)
    assert ds.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeValue == "P1"
    assert dataset_to_item(ds)["ScheduledProcedureStepSequence"][0]["Modality"] == "CT"
    assert dataset_to_item(ds)["AccessionNumber"] == "ACC1"
