"""DICOM value rules at the output: every checked item is one pydicom writes and reads back without a word."""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import config, dcmread, dcmwrite
from pydicom.datadict import dictionary_VM
from pydicom.dataset import Dataset

from engine.dicom.dataset import dataset_to_item, item_to_dataset, set_charset
from engine.dicom.vr import check_item
from engine.errors import ProcessingError, ProcessingWarning
from engine.hl7.er7 import Message
from engine.mapping import load_mapping, to_dataset
from engine.mapping.dicom_out import check_output

ROOT = Path(__file__).resolve().parents[2]
SPS = "ScheduledProcedureStepSequence"


@pytest.fixture(autouse=True)
def strict_pydicom() -> Iterator[None]:
    """pydicom raises on any value that breaks its VR, when writing and when reading."""
    saved = (config.settings.writing_validation_mode, config.settings.reading_validation_mode,
             config.datetime_conversion)
    config.settings.writing_validation_mode = config.RAISE
    config.settings.reading_validation_mode = config.RAISE
    config.datetime_conversion = True  # DA/TM/DT become date objects: an impossible date raises
    try:
        yield
    finally:
        (config.settings.writing_validation_mode, config.settings.reading_validation_mode,
         config.datetime_conversion) = saved


def _vm_max(tag: int) -> int:
    top = dictionary_VM(tag).split("-")[-1]
    return int(top) if top.isdigit() else 0


def _walk(ds: Dataset) -> None:
    for elem in ds:
        value = elem.value  # converted (and validated) on first access
        if elem.VR == "SQ":
            for sub in value:
                _walk(sub)
            continue
        top = _vm_max(elem.tag)
        assert not top or elem.VM <= top, f"{elem.keyword}: VM {elem.VM} > {top}"


def read_back(item: dict[str, Any], charset: str = "ISO_IR 192") -> dict[str, Any]:
    """Build the answer Dataset as the SCP does, write it, read it back strictly; the item pydicom saw."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_dataset(item, validate=True)
        ds = item_to_dataset(item)
        set_charset(ds, charset)
        buf = BytesIO()
        dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
        back = dcmread(BytesIO(buf.getvalue()), force=True)
        _walk(back)
    with config.disable_value_validation():
        config.datetime_conversion = False
        out = dataset_to_item(back)
        config.datetime_conversion = True
    out.pop("SpecificCharacterSet", None)
    return out


def checked(item: dict[str, Any], **kw: Any) -> tuple[dict[str, Any], list[ProcessingWarning]]:
    found: list[ProcessingWarning] = []
    before = copy.deepcopy(item)
    out = check_item(item, warnings=found, **kw)
    assert item == before, "the input item was changed"
    return out, found


def targets(found: list[ProcessingWarning]) -> list[str]:
    assert all(w.code == 102 for w in found)
    return [w.target for w in found]


# -- nasty inputs, each read back by pydicom without a warning --------------------------------------

NASTY: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("24-char SH, cut", {"ScheduledStationName": "S" * 24}, {"ScheduledStationName": "S" * 16}),
    ("24-char SH identifier, dropped", {"AccessionNumber": "A" * 24}, {"AccessionNumber": ""}),
    ("20-char AE in a step", {SPS: [{"ScheduledStationAETitle": "AE" * 10, "Modality": "CT"}]},
     {SPS: [{"ScheduledStationAETitle": "", "Modality": "CT"}]}),
    ("AE with a control character", {SPS: [{"ScheduledStationAETitle": "CT\x011"}]},
     {SPS: [{"ScheduledStationAETitle": ""}]}),
    ("AE of spaces", {SPS: [{"ScheduledStationAETitle": "    "}]}, {SPS: [{"ScheduledStationAETitle": ""}]}),
    ("lower-case CS", {"PatientSex": "f", SPS: [{"Modality": "mr"}]}, {"PatientSex": "F", SPS: [{"Modality": "MR"}]}),
    ("CS with a hyphen", {"PatientSex": "F-"}, {"PatientSex": ""}),
    ("control characters in LO", {"RequestedProcedureDescription": "CT\r\nHead\x00\x1b"},
     {"RequestedProcedureDescription": "CT Head"}),
    ("LT keeps CR LF TAB, loses BEL", {"RequestedProcedureComments": "line 1\r\n\tline 2\x07"},
     {"RequestedProcedureComments": "line 1\r\n\tline 2"}),
    ("control character in an identifier", {"PatientID": "12\t34"}, {"PatientID": ""}),
    ("backslash in single-valued LO", {"RequestedProcedureDescription": "CT Head\\Neck"},
     {"RequestedProcedureDescription": "CT Head"}),
    ("one bad value of several", {"OtherPatientIDs": ["A1", "B\x072", "C" * 70]}, {"OtherPatientIDs": "A1"}),
    ("30 February", {"PatientBirthDate": "19800230"}, {"PatientBirthDate": ""}),
    ("ISO date", {"PatientBirthDate": "1980-02-03"}, {"PatientBirthDate": ""}),
    ("date range", {"PatientBirthDate": "19800101-19800202"}, {"PatientBirthDate": ""}),
    ("month 13", {SPS: [{"ScheduledProcedureStepStartDate": "20261325"}]},
     {SPS: [{"ScheduledProcedureStepStartDate": ""}]}),
    ("hour 25", {SPS: [{"ScheduledProcedureStepStartTime": "2500"}]}, {SPS: [{"ScheduledProcedureStepStartTime": ""}]}),
    ("time with colons", {SPS: [{"ScheduledProcedureStepStartTime": "10:00"}]},
     {SPS: [{"ScheduledProcedureStepStartTime": ""}]}),
    ("7 fraction digits", {SPS: [{"ScheduledProcedureStepStartTime": "100000.1234567"}]},
     {SPS: [{"ScheduledProcedureStepStartTime": ""}]}),
    ("odd time length", {SPS: [{"ScheduledProcedureStepStartTime": "100"}]},
     {SPS: [{"ScheduledProcedureStepStartTime": ""}]}),
    ("DT hour 25 and a +15 offset", {"IssueDateOfImagingServiceRequest": "20261125", "ContentDate": "20261125",
                                     "FrameReferenceDateTime": "2026112525"},
     {"IssueDateOfImagingServiceRequest": "20261125", "ContentDate": "20261125", "FrameReferenceDateTime": ""}),
    ("DT offset out of range", {"FrameReferenceDateTime": "20261125100000+1500"}, {"FrameReferenceDateTime": ""}),
    ("70-char UI", {"StudyInstanceUID": "1." + "2" * 68}, {"StudyInstanceUID": ""}),
    ("UI leading zero", {"StudyInstanceUID": "1.2.03.4"}, {"StudyInstanceUID": ""}),
    ("UI trailing dot", {"StudyInstanceUID": "1.2.3."}, {"StudyInstanceUID": ""}),
    ("UI with letters", {"StudyInstanceUID": "1.2.A"}, {"StudyInstanceUID": ""}),
    ("PN group too long", {"PatientName": "F" * 70 + "^Jane"}, {"PatientName": "F" * 64}),
    ("PN ideographic group too long", {"PatientName": "Yamada^Taro=" + "山" * 70},
     {"PatientName": "Yamada^Taro=" + "山" * 64}),
    ("PN with 4 groups and 6 components", {"PatientName": "a^b^c^d^e^f=g=h=i"}, {"PatientName": "a^b^c^d^e=g=h"}),
    ("PN with a backslash", {"ReferringPhysicianName": "House^G\\Wilson^J"}, {"ReferringPhysicianName": "House^G"}),
    ("sequence item code value too long", {"RequestedProcedureCodeSequence": [
        {"CodeValue": "C" * 20, "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "M" * 70}]},
     {"RequestedProcedureCodeSequence": [
         {"CodeValue": "", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "M" * 64}]}),
    ("DS too long is rounded", {"PatientWeight": "70.1234567890123456"}, {"PatientWeight": "70.1234567890124"}),
    ("DS not a number", {"PatientSize": "1,80"}, {"PatientSize": ""}),
    ("IS out of range", {"NumberOfStudyRelatedSeries": "99999999999"}, {"NumberOfStudyRelatedSeries": ""}),
]


@pytest.mark.parametrize(("item", "want"), [(i, w) for _, i, w in NASTY], ids=[n for n, _, _ in NASTY])
def test_nasty_values_are_cut_or_dropped_and_read_back_cleanly(item: dict[str, Any], want: dict[str, Any]) -> None:
    out, found = checked(item)
    assert found, "a repair without a warning"
    assert read_back(out) == read_back(want)
    for w in found:
        assert w.target.split("[")[0].split(".")[0] in item
    # and what we got is already clean: checking again changes nothing
    again, more = checked(out)
    assert again is out and more == []


def test_nasty_input_read_strictly_fails_without_the_checker() -> None:
    """The read-back is strict enough to see what the checker prevents."""
    for bad in ({"ScheduledStationName": "S" * 24}, {"StudyInstanceUID": "1.2.03.4"}, {"PatientSex": "f"},
                {"PatientBirthDate": "19800230"}):
        with pytest.raises(ValueError):
            read_back(bad)
    with pytest.raises(AssertionError, match="VM"):
        read_back({"RequestedProcedureDescription": "CT Head\\Neck"})


def test_warning_targets_name_the_path_inside_sequences() -> None:
    item = {SPS: [{"Modality": "CT"}, {"Modality": "ct", "ScheduledStationAETitle": "X" * 20}]}
    out, found = checked(item, locations={f"{SPS}.ScheduledStationAETitle": "ORC-18.1"}, source="mappings/m.yaml")
    assert targets(found) == [f"{SPS}[1].Modality", f"{SPS}[1].ScheduledStationAETitle"]
    assert found[1].location == "ORC-18.1" and found[1].source == "mappings/m.yaml"
    assert found[1].as_dict()["target"] == f"{SPS}[1].ScheduledStationAETitle"
    assert out[SPS][0] is item[SPS][0]  # an untouched step item is not copied


def test_warnings_never_carry_the_value() -> None:
    _, found = checked({"PatientName": "Smithsonian" * 8, "PatientID": "SECRET-" * 12, "PatientComments": "x\x00"})
    assert len(found) == 3
    for w in found:
        assert "Smithsonian" not in str(w) and "SECRET" not in str(w) and "x\x00" not in str(w)


# -- truncation of multibyte text ----------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_latin1_and_utf8_text_is_cut_at_characters(charset: str) -> None:
    item = {
        "RequestedProcedureDescription": "Röntgen Thorax " + "ü" * 60,  # 75 characters, LO 64
        "ScheduledStationName": "Station Süd " + "é" * 10,  # SH 16
        "PatientName": "Müller-" + "ß" * 70 + "^Jürgen",
    }
    out, found = checked(item)
    assert len(found) == 3
    assert out["RequestedProcedureDescription"] == ("Röntgen Thorax " + "ü" * 60)[:64]
    # 16 characters would be 21 bytes in UTF-8, padded to 22, which pydicom reads as 17 characters
    assert out["ScheduledStationName"] == "Station Süd ééé"
    assert out["PatientName"] == ("Müller-" + "ß" * 70)[:64]
    back = read_back(out, charset)
    assert back == out
    encoding = "latin-1" if charset == "ISO_IR 100" else "utf-8"
    for value in out.values():
        value.encode(encoding).decode(encoding)  # whole characters only


def test_utf8_text_outside_latin1_goes_out_as_utf8() -> None:
    out, _ = checked({"RequestedProcedureDescription": "Ψ" * 65 + "x", "PatientName": "山田^太郎"})
    assert len(out["RequestedProcedureDescription"]) == 64
    assert read_back(out, "ISO_IR 100") == out  # set_charset falls back to ISO_IR 192


def test_text_at_the_limit_fits_once_padded() -> None:
    even, odd = "ü" * 16, "ü" * 15 + "u"  # 32 and 31 bytes in UTF-8
    assert checked({"ScheduledStationName": even}) == ({"ScheduledStationName": even}, [])
    out, found = checked({"ScheduledStationName": odd})
    assert out == {"ScheduledStationName": "ü" * 15} and targets(found) == ["ScheduledStationName"]
    read_back(out)
    ident = {"AccessionNumber": odd}  # an identifier is never cut: valid DICOM, left as it is
    assert checked(ident) == (ident, [])


def test_the_last_of_several_values_fits_once_padded() -> None:
    odd = {"PatientTelephoneNumbers": "ab\\" + "1" * 16}  # 19 bytes: padded, the last value reads as 17
    out, found = checked(odd)
    assert out == {"PatientTelephoneNumbers": "ab\\" + "1" * 15} and targets(found) == ["PatientTelephoneNumbers"]
    read_back(out)
    even = {"PatientTelephoneNumbers": "a\\" + "1" * 16}
    assert checked(even) == (even, [])
    read_back(even)


def test_multi_valued_text_outside_latin1_is_answered_in_utf8() -> None:
    item = {"MedicalAlerts": "Latex\\山", "OtherPatientNames": "Müller^Jürgen\\山田^太郎"}
    assert checked(item) == (item, [])
    assert read_back(item, "ISO_IR 100") == item  # before the fix: UnicodeEncodeError, answered as ISO_IR 100


def test_a_cut_never_separates_a_letter_from_its_accent() -> None:
    decomposed = "e\u0301"  # é as e + COMBINING ACUTE ACCENT
    value = "x" * 15 + decomposed  # 17 code points: the cut at 16 would strip the accent
    out, found = checked({"ScheduledStationName": value})
    assert out["ScheduledStationName"] == "x" * 15 and len(found) == 1
    assert read_back(out) == out


# -- what passes, what is refused ------------------------------------------------------------------------


CLEAN = {
    "SpecificCharacterSet": "ISO_IR 100",
    "PatientID": "100234",
    "IssuerOfPatientID": "HOSP",
    "PatientName": "Müller^Jürgen^^Hr",
    "PatientBirthDate": "19800229",
    "PatientSex": "M",
    "AccessionNumber": "ACC1001",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1001",
    "OtherPatientIDs": "A\\B",
    "PatientWeight": "70.5",
    "RequestedProcedureComments": "two lines\r\nof text \\ with a backslash",
    "ReferencedStudySequence": [],
    SPS: [{
        "Modality": "CT",
        "ScheduledStationAETitle": "CT_1 room-2",
        "ScheduledProcedureStepStartDate": "20261125",
        "ScheduledProcedureStepStartTime": "100000.5",
        "ScheduledPerformingPhysicianName": "",
        "ScheduledProtocolCodeSequence": [{"CodeValue": "CTHEAD", "CodingSchemeDesignator": "LOCAL"}],
    }],
}


def test_a_clean_item_is_returned_as_is() -> None:
    out, found = checked(CLEAN, required=("PatientID", f"{SPS}.Modality"))
    assert out is CLEAN and found == []
    assert read_back(out, "ISO_IR 100")["PatientName"] == "Müller^Jürgen^^Hr"


def test_valid_forms_of_time_and_datetime_pass() -> None:
    for tm in ("10", "1000", "100000", "100000.123456", "235960"):
        assert checked({"StudyTime": tm}) == ({"StudyTime": tm}, [])
    for dt in ("2026", "202611", "20261125", "2026112510", "20261125100000.5+0100", "20261125100000-0500"):
        assert checked({"FrameReferenceDateTime": dt}) == ({"FrameReferenceDateTime": dt}, [])


def test_padding_and_numbers_are_normalised_without_a_warning() -> None:
    out, found = checked({"StudyInstanceUID": "1.2.3\x00", "PatientSex": "M ", "PatientWeight": 70.5,
                          "NumberOfStudyRelatedSeries": 3, "PatientID": 12345})
    assert found == []
    assert out == {"StudyInstanceUID": "1.2.3", "PatientSex": "M ", "PatientWeight": "70.5",
                   "NumberOfStudyRelatedSeries": "3", "PatientID": "12345"}
    read_back(out)


def test_binary_numbers_from_strings_and_a_bad_one_dropped() -> None:
    out, found = checked({"NumberOfFrames": "4", "Rows": "512", "Columns": "-1"})
    assert out["Rows"] == 512 and targets(found) == ["Columns"]
    read_back({"Rows": 512})


def test_shapes_that_are_not_values_are_dropped() -> None:
    out, found = checked({"PatientID": {"a": 1}, SPS: "CT", "RequestedProcedureCodeSequence": ["x", {"CodeValue": "A"}],
                          "NotADicomKeyword": "kept as it is"})
    assert out == {"PatientID": "", SPS: [], "RequestedProcedureCodeSequence": [{"CodeValue": "A"}],
                   "NotADicomKeyword": "kept as it is"}
    assert targets(found) == ["PatientID", SPS, "RequestedProcedureCodeSequence[0]"]


def test_required_value_dropped_is_refused_with_102() -> None:
    with pytest.raises(ProcessingError) as exc:
        checked({"PatientID": "P" * 70}, required=("PatientID",), locations={"PatientID": "PID-3.1"})
    assert exc.value.code == 102 and exc.value.ack_code == "AE" and exc.value.location == "PID-3.1"
    assert "P" * 20 not in str(exc.value)
    with pytest.raises(ProcessingError) as exc:
        checked({SPS: [{"Modality": "CT"}, {"Modality": "C-T"}]}, required=(f"{SPS}.Modality",))
    assert exc.value.code == 102 and f"{SPS}[1].Modality" in exc.value.text


def test_required_value_missing_or_empty_is_refused_with_101() -> None:
    for item in ({}, {"PatientID": ""}, {"PatientID": None}):
        with pytest.raises(ProcessingError) as exc:
            checked(item, required={"PatientID"})
        assert exc.value.code == 101
    with pytest.raises(ProcessingError) as exc:
        checked({SPS: [{"Modality": "CT"}, {}]}, required=[f"{SPS}.Modality"])
    assert exc.value.code == 101 and f"{SPS}[1].Modality" in exc.value.text
    # an optional value that is dropped is only a warning
    out, found = checked({"PatientID": "1", "AccessionNumber": "A" * 17}, required=("PatientID",))
    assert out["AccessionNumber"] == "" and targets(found) == ["AccessionNumber"]


# -- the output boundary ---------------------------------------------------------------------------------


def test_check_output_checks_the_dataset_of_a_worklist_output() -> None:
    output = {"control": {"order_control": "NW"}, "dataset": {"PatientID": "1", SPS: [{"Modality": "ct"}]}}
    found: list[ProcessingWarning] = []
    out = check_output(output, warnings=found, required=("PatientID",))
    assert out["dataset"][SPS][0]["Modality"] == "CT" and out["control"] is output["control"]
    assert output["dataset"][SPS][0]["Modality"] == "ct"
    assert targets(found) == [f"{SPS}[0].Modality"]
    clean = {"control": {}, "dataset": {"PatientID": "1"}}
    assert check_output(clean, warnings=found) is clean
    assert check_output({"Modality": "mr"}, warnings=found) == {"Modality": "MR"}


@pytest.mark.parametrize("sample", ["orm_o01_ct.hl7", "orm_o01_two_orders.hl7", "omi_o23.hl7", "orm_latin1.hl7"])
def test_shipped_mapping_outputs_pass_unchanged(sample: str) -> None:
    mapping = load_mapping(ROOT / "mappings" / "orm-to-worklist.yaml")
    for output in mapping.run(Message.parse((ROOT / "samples" / "hl7" / sample).read_bytes())):
        found: list[ProcessingWarning] = []
        assert check_output(output, warnings=found, required=("PatientID", f"{SPS}.Modality")) is output
        assert found == []
        read_back(output["dataset"], "ISO_IR 100")


# -- random nasty values: whatever comes in, pydicom reads what comes out ---------------------------

FUZZ_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight", "PatientComments",
    "MedicalAlerts", "OtherPatientNames", "AccessionNumber", "StudyInstanceUID", "RequestedProcedureDescription",
    "RequestedProcedureComments", "NumberOfStudyRelatedSeries", "StudyTime", "FrameReferenceDateTime",
    "StrainDescription", "RetrieveURL", "PregnancyStatus", "PatientTelephoneNumbers",
)
FUZZ_SPS_KEYWORDS = (
    "Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription", "ScheduledStationName",
)
FUZZ_CHARS = (
    "ABCXYZ", "abcxyz", "0123456789", "0123456789", " ", "\\", "^", "=", ".", "-", ":", "_", "/", "+",
    "\x00", "\x07", "\r", "\n", "\t", "\x1b", "\x85", "\x7f", "ü", "é", "ß", "山", "\u0301", "\u00a0",
)


def _fuzz_value(rng: random.Random) -> str:
    if rng.random() < 0.4:  # digit strings near the DA/TM/DT/UI/DS/IS forms
        base = rng.choice(["20261125", "19800229", "100000.5", "1.2.840.10008", "70.5", "12", "2026112510"])
        chars = list(base)
        for _ in range(rng.randrange(3)):
            chars.insert(rng.randrange(len(chars) + 1), rng.choice("0123456789.-+ \\:"))
        return "".join(chars)
    n = rng.choice([1, 2, 5, 15, 16, 17, 30, 63, 64, 65, 70, 200])
    return "".join(rng.choice(rng.choice(FUZZ_CHARS)) for _ in range(n))


@pytest.mark.parametrize("seed", range(8))
def test_random_values_always_come_out_readable(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        item: dict[str, Any] = {k: _fuzz_value(rng) for k in rng.sample(FUZZ_KEYWORDS, 10)}
        item[SPS] = [{k: _fuzz_value(rng) for k in rng.sample(FUZZ_SPS_KEYWORDS, 5)}]
        out, _ = checked(item)
        read_back(out, rng.choice(["ISO_IR 100", "ISO_IR 192"]))
        again, more = checked(out)
        assert again == out and more == []
