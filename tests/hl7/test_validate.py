from __future__ import annotations

from pathlib import Path

import pytest

from engine.hl7.er7 import Message
from engine.hl7.validate import validate_structure

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "hl7"


@pytest.mark.parametrize(
    "name",
    ["orm_o01_ct.hl7", "orm_o01_two_orders.hl7", "omi_o23.hl7", "oru_r01.hl7", "adt_a08.hl7", "adt_a40.hl7",
     "orm_latin1.hl7"],
)
def test_samples_are_valid(name: str) -> None:
    assert validate_structure(Message.parse((SAMPLES / name).read_bytes())) == []


def test_lf_terminators_and_fifth_encoding_character_are_fed_normalised() -> None:
    text = "MSH|^~\\&#|A|B|C|D|20260101||ADT^A08^ADT_A01|1|P|2.5.1\nEVN||20260101\nPID|1||1||Doe\nPV1|1|O\nZXY|1\n"
    assert validate_structure(Message.parse(text)) == []


def test_missing_segment() -> None:
    text = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08^ADT_A01|1|P|2.5.1\rEVN||20260101\rPV1|1|O\r"
    errs = validate_structure(Message.parse(text))
    assert [(e.code, e.location) for e in errs] == [(100, "PV1")]


def test_segment_order() -> None:
    text = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08^ADT_A01|1|P|2.5.1\rPID|1||1||Doe\rEVN||20260101\rPV1|1|O\r"
    errs = validate_structure(Message.parse(text))
    assert [(e.code, e.location) for e in errs] == [(100, "PID")]


def test_unknown_segment() -> None:
    text = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08^ADT_A01|1|P|2.5.1\rEVN||20260101\rPID|1||1||Doe\rPV1|1|O\rQQQ|1\r"
    assert [(e.code, e.location) for e in validate_structure(Message.parse(text))] == [(100, "QQQ")]


def test_required_field_missing() -> None:
    text = (
        "MSH|^~\\&|A|B|C|D|20260101||ADT^A08^ADT_A01|1|P|2.5.1\rEVN||20260101\rPID|1||1||Doe\rPV1|1|O\r"
        "OBX|1|TX|x||y\r"
    )
    errs = validate_structure(Message.parse(text))
    assert [(e.code, e.location, e.ack_code) for e in errs] == [(101, "OBX-11", "AE")]


def test_bad_date_is_data_type_error() -> None:
    text = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08^ADT_A01|1|P|2.5.1\rEVN||20260101\rPID|1||1||Doe||2026xx01\rPV1|1|O\r"
    errs = validate_structure(Message.parse(text))
    assert [e.code for e in errs] == [102]
    assert "2026xx01" not in errs[0].text  # no values (PHI) in error texts


def test_orm_choice_group() -> None:
    ok = "MSH|^~\\&|A|B|C|D|20260101||ORM^O01|1|P|2.3.1\rPID|1||1||Doe\rORC|NW\r"
    assert validate_structure(Message.parse(ok)) == []
    bad = "MSH|^~\\&|A|B|C|D|20260101||ORM^O01|1|P|2.3.1\rPID|1||1||Doe\rOBR|1||||\r"
    assert (100, "OBR") in [(e.code, e.location) for e in validate_structure(Message.parse(bad))]


def test_unsupported_version_and_type() -> None:
    v = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08^ADT_A01|1|P|9.9\rEVN||20260101\r"
    assert [(e.code, e.location) for e in validate_structure(Message.parse(v))] == [(203, "MSH-12")]
    t = "MSH|^~\\&|A|B|C|D|20260101||XYZ^Q99|1|P|2.5.1\rEVN||20260101\r"
    assert [(e.code, e.location) for e in validate_structure(Message.parse(t))] == [(200, "MSH-9")]
