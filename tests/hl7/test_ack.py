from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ProcessingError
from engine.hl7.ack import ack_mode, build_ack, build_ack_from_raw, erl, new_control_id, should_send
from engine.hl7.er7 import Message

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "hl7"
ORM = Message.parse((SAMPLES / "orm_o01_ct.hl7").read_bytes())  # v2.3.1
OMI = Message.parse((SAMPLES / "omi_o23.hl7").read_bytes())  # v2.5.1


def test_aa_header_swapped() -> None:
    ack = Message.parse(build_ack(OMI, "AA"))
    assert ack.message_type == "ACK^O23"
    assert ack.structure == "ACK"
    assert (ack.sending_application, ack.sending_facility) == ("ENGINE", "HOSPITAL")
    assert (ack.receiving_application, ack.receiving_facility) == ("RIS", "RADIOLOGY")
    assert ack.version == "2.5.1"
    assert ack.processing_id == "P"
    assert ack.get("MSA-1") == "AA"
    assert ack.get("MSA-2") == "OMI0001"
    assert ack.control_id and ack.control_id != "OMI0001"
    assert ack.segments("ERR") == []
    assert ack.get("MSH-7")[:2] == "20"


def test_control_ids_unique() -> None:
    ids = {new_control_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(len(i) <= 20 for i in ids)
    assert build_ack(OMI, "AA", control_id="FIXED1").split("\r")[0].split("|")[9] == "FIXED1"


def test_ae_with_err_segment() -> None:
    err = ProcessingError("ORC-7.4 start time missing | see ^spec^", 101, "ORC-7.4")
    ack = Message.parse(build_ack(OMI, "AE", err))
    assert ack.get("MSA-1") == "AE"
    assert ack.get("MSA-3") == "ORC-7.4 start time missing | see ^spec^"
    assert ack.get("ERR-2") == "ORC^1^7^1^4"
    assert ack.get("ERR-2.3") == "7"
    assert ack.components("ERR-3") == ["101", "Required field missing", "HL70357"]
    assert ack.get("ERR-4") == "E"
    assert ack.get("ERR-8") == "ORC-7.4 start time missing | see ^spec^"
    assert ack.get("ERR-1") == ""  # v2.5+: no ERR-1


def test_v231_also_fills_err1() -> None:
    ack = Message.parse(build_ack(ORM, "AR", ProcessingError("unsupported", 200, "MSH-9", ack_code="AR")))
    assert ack.version == "2.3.1"
    assert ack.get("ERR-1.1") == "MSH" and ack.get("ERR-1.3") == "9"
    assert ack.get("ERR-1.4.1") == "200"
    assert ack.get("ERR-2") == "MSH^1^9^1"


def test_msh18_and_msh11_echoed() -> None:
    m = Message.parse((SAMPLES / "orm_latin1.hl7").read_bytes())
    ack = Message.parse(build_ack(m, "CA"))
    assert ack.charset == "8859/1"
    assert ack.get("MSA-1") == "CA"
    t = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|T9|T^A|2.4\r")
    assert Message.parse(build_ack(t, "AA")).processing_id == "T^A"


@pytest.mark.parametrize("code", ["CE", "CR", "AR"])
def test_enhanced_and_reject_codes(code: str) -> None:
    ack = Message.parse(build_ack(OMI, code, ProcessingError("x", 207)))
    assert ack.get("MSA-1") == code
    assert ack.get("ERR-3.1") == "207"


def test_bad_code() -> None:
    with pytest.raises(ValueError):
        build_ack(OMI, "OK")


@pytest.mark.parametrize(
    "location, expected",
    [
        ("ORC-7.4", "ORC^1^7^1^4"),
        ("PID-3", "PID^1^3^1"),
        ("PID-3[2].4.1", "PID^1^3^2^4^1"),
        ("OBX[3]-5", "OBX^3^5^1"),
        ("MSH", "MSH^1"),
        ("", ""),
        ("somewhere", ""),
    ],
)
def test_erl(location: str, expected: str) -> None:
    assert erl(location) == expected


def test_ack_mode_defaults() -> None:
    assert ack_mode(OMI) == ("", "") and ack_mode(OMI).original
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|T1|P|2.5|||AL|NE\r")
    assert ack_mode(m) == ("AL", "NE") and not ack_mode(m).original
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|T1|P|2.5||||ER\r")
    assert ack_mode(m) == ("AL", "ER")


def test_should_send() -> None:
    assert should_send("AL", True) and should_send("AL", False)
    assert not should_send("NE", True) and not should_send("NE", False)
    assert should_send("ER", False) and not should_send("ER", True)
    assert should_send("SU", True) and not should_send("SU", False)


def test_from_raw_bad_msh2() -> None:
    raw = b"MSH|^~\\&x|RIS|RAD|ENG|HOSP|2026||ORM^O01|CID9|P|2.5.1\rPID|1\r"
    with pytest.raises(ProcessingError):
        Message.parse(raw)
    text = build_ack_from_raw(raw, "AR", ProcessingError("bad MSH-2", 102, "MSH-2", ack_code="AR"))
    assert text is not None
    ack = Message.parse(text)
    assert ack.get("MSA-1") == "AR" and ack.get("MSA-2") == "CID9"
    assert ack.message_type == "ACK^O01"
    assert ack.sending_application == "ENG" and ack.receiving_application == "RIS"
    assert ack.get("ERR-2") == "MSH^1^2^1"


def test_from_raw_undecodable() -> None:
    raw = "MSH|^~\\&|RIS|RAD|ENG|HOSP|||ADT^A08|C7|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller\r".encode("latin-1")
    err = None
    try:
        Message.parse(raw)
    except ProcessingError as e:
        err = e
    assert err is not None
    ack = Message.parse(build_ack_from_raw(raw, "AE", err) or "")
    assert ack.get("MSA-2") == "C7" and ack.get("ERR-3.1") == "102"


def test_from_raw_without_msh() -> None:
    assert build_ack_from_raw(b"hello", "AR", None) is None
    assert build_ack_from_raw(b"", "AR", None) is None
