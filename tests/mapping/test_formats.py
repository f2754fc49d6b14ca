"""Every named format, through real rules (so locations and sources are checked too)."""

from __future__ import annotations

import pytest

from engine.errors import ProcessingError, ProcessingWarning
from engine.hl7.er7 import Message
from engine.mapping import FORMATS, FormatRegistry, load_mapping
from engine.mapping.formats import accession_uid, convert_dtm, valid_uid

MSH = "MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C1|P|2.5.1"


def one(mapping, rule: str, segment: str, header: str = "settings: {timezone: Europe/Berlin}\n"):
    """Map `x: <rule>` over MSH + `segment`; return x."""
    return warned(mapping, rule, segment, header)[0]


def warned(
    mapping, rule: str, segment: str, header: str = "settings: {timezone: Europe/Berlin}\n"
) -> tuple[object, list[ProcessingWarning]]:
    """Map `x: <rule>` over MSH + `segment`; return x and the warnings."""
    m = mapping(f"x: {rule}", header=header)
    warnings: list[ProcessingWarning] = []
    return m.run(Message.parse(MSH + "\r" + segment), warnings)[0].get("x"), warnings


def rejected(
    mapping, rule: str, segment: str, header: str = "settings: {timezone: Europe/Berlin}\n"
) -> ProcessingError:
    """The refusal of `x: <rule>` with on_invalid: reject."""
    with pytest.raises(ProcessingError) as err:
        one(mapping, rule.replace("{", "{on_invalid: reject, ", 1), segment, header)
    return err.value


@pytest.mark.parametrize(
    ("dtm", "da", "tm"),
    [
        ("20261125", "20261125", ""),
        ("202611251000", "20261125", "100000"),
        ("20261125101530", "20261125", "101530"),
        ("20261125101530.25", "20261125", "101530.25"),
        ("202611252330+0000", "20261126", "003000"),  # UTC -> Berlin (CET, +1) crosses midnight
        ("202607011200-0400", "20260701", "180000"),  # summer time in Berlin (+2)
        ("", "", ""),
    ],
)
def test_dtm_to_da_and_tm(mapping, dtm, da, tm):
    assert one(mapping, "{from: TQ1-7, format: dtm_to_da}", f"TQ1|1||||||{dtm}") == da
    assert one(mapping, "{from: TQ1-7, format: dtm_to_tm}", f"TQ1|1||||||{dtm}") == tm


def test_offset_kept_when_no_timezone_setting(mapping):
    assert one(mapping, "{from: TQ1-7, format: dtm_to_tm}", "TQ1|1||||||202611252330+0000", header="") == "233000"


@pytest.mark.parametrize(
    "bad", ["2026112", "20261325", "20260230", "2026112510xx", "202611251099", "hello", "202611251000+9900"]
)
def test_bad_dates_are_102_at_the_path(mapping, bad):
    err = rejected(mapping, "{from: TQ1-7, format: dtm_to_da}", f"TQ1|1||||||{bad}")
    assert err.code == 102
    assert err.location == "TQ1-7"
    assert err.source == "mappings/m.yaml:6"  # header line + settings line
    value, (w,) = warned(mapping, "{from: TQ1-7, format: dtm_to_da}", f"TQ1|1||||||{bad}")
    assert value == "" and (w.code, w.location, w.source, w.target) == (102, "TQ1-7", "mappings/m.yaml:6", "x")
    assert bad not in w.text


def test_partial_date_cannot_be_a_dicom_date(mapping):
    err = rejected(mapping, "{from: PID-7, format: dtm_to_da}", "PID|1||1||X||1980")
    assert err.code == 102 and "DA" in err.text


@pytest.mark.parametrize(
    ("iso", "da", "tm"),
    [
        ("2026-11-25T08:30:00+01:00", "20261125", "083000"),
        ("2026-11-25 08:30", "20261125", "083000"),
        ("2026-11-25T07:30:00Z", "20261125", "083000"),
        ("2026-11-25", "20261125", ""),
    ],
)
def test_iso_8601_timestamps_are_read_with_a_warning(mapping, iso, da, tm):
    value, (w,) = warned(mapping, "{from: TQ1-7, format: dtm_to_da, required: true}", f"TQ1|1||||||{iso}")
    assert value == da and (w.code, w.location, w.target) == (102, "TQ1-7", "x") and "ISO 8601" in w.text
    value, warnings = warned(mapping, "{from: TQ1-7, format: dtm_to_tm}", f"TQ1|1||||||{iso}")
    assert value == tm and len(warnings) == 1
    fhir, _ = warned(mapping, "{from: TQ1-7, format: dtm_to_fhir}", f"TQ1|1||||||{iso}")
    assert str(fhir).startswith("2026-11-25")


def test_dtm_to_dt_and_fhir(mapping):
    seg = "TQ1|1||||||20261125101530"
    assert one(mapping, "{from: TQ1-7, format: dtm_to_dt}", seg) == "20261125101530+0100"
    assert one(mapping, "{from: TQ1-7, format: dtm_to_fhir}", seg) == "2026-11-25T10:15:30+01:00"
    assert one(mapping, "{from: TQ1-7, format: dtm_to_fhir}", "TQ1|1||||||202611251015+0000") == "2026-11-25T10:15:00Z"
    assert one(mapping, "{from: TQ1-7, format: dtm_to_fhir}", "TQ1|1||||||198005") == "1980-05"
    assert one(mapping, "{from: TQ1-7, format: dtm_to_fhir}", "TQ1|1||||||19800512") == "1980-05-12"
    assert one(mapping, "{from: TQ1-7, format: dtm_to_dt}", "TQ1|1||||||19800512") == "19800512"


def test_convert_dtm_is_pure():
    assert convert_dtm("da", "20261125", None) == "20261125"
    assert convert_dtm("fhir", "2026", None) == "2026"


@pytest.mark.parametrize(
    ("xpn", "pn"),
    [
        ("Doe^John^Q^III^Dr", "Doe^John^Q^Dr^III"),  # suffix and prefix swap places
        ("Doe^John", "Doe^John"),
        ("Doe^John^^^", "Doe^John"),  # trailing ^ trimmed
        ("O\\S\\Brien^Mary", "O Brien^Mary"),  # decoded ^ must not split the name
        ("M\\T\\M^Anne", "M&M^Anne"),  # \T\ is a literal &, not a subcomponent
        ("O\\S\\Brien", "O Brien"),  # a lone escaped ^ is not a separator
        ("Smith&van^Jan", "Smith^Jan"),  # FN: surname is the first subcomponent
        ("", ""),
    ],
)
def test_xpn_to_pn(mapping, xpn, pn):
    assert one(mapping, "{from: PID-5, format: xpn_to_pn}", f"PID|1||1||{xpn}") == pn


def test_xcn_to_pn_skips_the_id(mapping):
    assert (
        one(mapping, "{from: PV1-8, format: xcn_to_pn}", "PV1|1|O||||||4711^House^Gregory^^^Dr") == "House^Gregory^^Dr"
    )
    # CNN inside a component (OBR-34 NDL): the subcomponents are the parts
    assert one(mapping, "{from: OBR-34.1, format: xcn_to_pn}", "OBR|1" + "|" * 33 + "T1&Tech&Tina") == "Tech^Tina"


def test_cwe_to_code_item(mapping):
    rule = "{from: OBR-4, format: cwe_to_code_item}"
    assert one(mapping, rule, "OBR|1|||CT1^CT Head^RADLEX") == {
        "CodeValue": "CT1",
        "CodingSchemeDesignator": "RADLEX",
        "CodeMeaning": "CT Head",
    }
    assert one(mapping, rule, "OBR|1|||CT1") == {
        "CodeValue": "CT1",
        "CodingSchemeDesignator": "L",
        "CodeMeaning": "CT1",
    }
    assert one(mapping, rule, "OBR|1|||^^^ALT1^Alt text^99X") == {
        "CodeValue": "ALT1",
        "CodingSchemeDesignator": "99X",
        "CodeMeaning": "Alt text",
    }
    assert one(mapping, rule, "OBR|1|||") == ""
    err = rejected(mapping, rule, "OBR|1|||^Only text")
    assert err.code == 102 and err.location == "OBR-4"
    value, (w,) = warned(mapping, rule, "OBR|1|||^Only text")  # no valid code item: dropped
    assert value == "" and (w.code, w.location) == (102, "OBR-4") and "no code" in w.text


def test_cwe_to_codeable_concept(mapping):
    rule = "{from: OBX-3, format: cwe_to_codeable_concept}"
    assert one(mapping, rule, "OBX|1|CE|24558-9^CT Head^LN^CTH^CT head^L") == {
        "coding": [
            {"system": "http://loinc.org", "code": "24558-9", "display": "CT Head"},
            {"code": "CTH", "display": "CT head"},
        ],
        "text": "CT Head",
    }
    assert one(mapping, rule, "OBX|1|CE|^free text only") == {"text": "free text only"}
    assert one(mapping, rule, "OBX|1|CE|F^Female^HL70001") == {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0001", "code": "F", "display": "Female"}],
        "text": "Female",
    }


@pytest.mark.parametrize(
    ("hl7", "dicom"), [("M", "M"), ("F", "F"), ("O", "O"), ("A", "O"), ("N", "O"), ("U", ""), ("", ""), ("f", "F")]
)
def test_sex_to_dicom(mapping, hl7, dicom):
    assert one(mapping, "{from: PID-8, format: sex_to_dicom}", f"PID|1||1||X||19800101|{hl7}") == dicom


@pytest.mark.parametrize("sex", ["Q", "M-"])
def test_sex_outside_table_0001_is_103(mapping, sex):
    err = rejected(mapping, "{from: PID-8, format: sex_to_dicom}", f"PID|1||1||X||19800101|{sex}")
    assert err.code == 103 and err.location == "PID-8"
    value, (w,) = warned(mapping, "{from: PID-8, format: sex_to_dicom}", f"PID|1||1||X||19800101|{sex}")
    assert value == "" and (w.code, w.location, w.target) == (103, "PID-8", "x") and "value dropped" in w.text


def test_upper_and_trim(mapping):
    assert one(mapping, "{from: OBR-24, format: [trim, upper]}", "OBR|1" + "|" * 23 + " ct ") == "CT"


STUDY = "{from: ZDS-1.1, format: study_uid, accession: [IPC-1, OBR-18]}"


def test_study_uid_present_is_kept_and_checked(mapping):
    assert one(mapping, STUDY, "ZDS|1.2.3.4^ENGINE") == "1.2.3.4"
    err = rejected(mapping, STUDY, "ZDS|1.2.03.x")
    assert err.code == 102 and err.location == "ZDS-1.1"
    # dropped: as if ZDS-1 were empty, so the UID is derived from the accession number
    value, (w,) = warned(mapping, STUDY, "ZDS|1.2.03.x\rOBR|1" + "|" * 17 + "ACC77")
    assert value == one(mapping, STUDY, "OBR|1" + "|" * 17 + "ACC77") and w.location == "ZDS-1.1"


def test_study_uid_accession_based_is_stable_and_valid(mapping):
    seg = "OBR|1" + "|" * 17 + "ACC77"
    a = one(mapping, STUDY, seg)
    b = one(mapping, STUDY, seg)
    c = one(mapping, STUDY, seg.replace("ACC77", "ACC78"))
    assert a == b != c
    assert a.startswith("2.25.") and valid_uid(a)
    rooted = one(mapping, STUDY, seg, header='settings: {uid_root: "1.2.826.0.1.3680043.10.999"}\n')
    assert rooted.startswith("1.2.826.0.1.3680043.10.999.") and valid_uid(rooted) and len(rooted) <= 64
    assert valid_uid(accession_uid("1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19", "X" * 100))


def test_study_uid_without_accession_is_101(mapping):
    with pytest.raises(ProcessingError) as err:
        one(mapping, STUDY, "OBR|1")
    assert err.value.code == 101 and err.value.location == "OBR-18"


def test_study_uid_generate_and_reject(mapping):
    gen = "settings: {study_uid_policy: generate, uid_root: '1.2.3'}\n"
    rule = "{from: ZDS-1.1, format: study_uid}"
    a, b = one(mapping, rule, "OBR|1", header=gen), one(mapping, rule, "OBR|1", header=gen)
    assert a != b and a.startswith("1.2.3.") and valid_uid(a)
    with pytest.raises(ProcessingError) as err:
        one(mapping, rule, "OBR|1", header="settings: {study_uid_policy: reject}\n")
    assert err.value.code == 101 and err.value.location == "ZDS-1.1"


def test_a_new_format_is_one_registered_function(write_mapping):
    reg = FormatRegistry(dict(FORMATS.formats))

    @reg.register("reverse")
    def reverse(value, rule, scope):
        return value[::-1]

    path = write_mapping("name: t\ninput: hl7v2\noutput: json\nfields:\n  x: {from: MSH-10, format: reverse}\n")
    m = load_mapping(path, formats=reg)
    assert m.run(Message.parse(MSH))[0]["x"] == "1C"
    assert "reverse" not in FORMATS.formats
