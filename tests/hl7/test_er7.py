from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import ProcessingError
from engine.hl7.er7 import Message, compile_path

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "hl7"


def load(name: str) -> Message:
    return Message.parse((SAMPLES / name).read_bytes())


ORM = load("orm_o01_ct.hl7")


# ------------------------------------------------------------------ parsing and terminators


def test_sample_fields() -> None:
    m = load("orm_o01_ct.hl7")
    assert m.get("PID-3.1") == "100234"
    assert m.get("PID-3.4") == "HOSP"
    assert m.get("PID-5") == "Doe^Jane^Anne^^Mrs"
    assert m.get("PID-5.2") == "Jane"
    assert m.get("OBR-18") == "ACC1001"
    assert m.get("ORC-7.4") == "202611251000"
    assert m.get("MSH-10") == "ORM0001"
    assert m.get("OBR-24") == "CT"
    assert m.get("ZDS-1.1") == "1.2.826.0.1.3680043.8.498.1001"


def test_header_properties() -> None:
    m = load("omi_o23.hl7")
    assert m.message_type == "OMI^O23"
    assert m.trigger == "O23"
    assert m.structure == "OMI_O23"
    assert m.control_id == "OMI0001"
    assert m.version == "2.5.1"
    assert m.processing_id == "P"
    assert (m.sending_application, m.sending_facility) == ("RIS", "RADIOLOGY")
    assert (m.receiving_application, m.receiving_facility) == ("ENGINE", "HOSPITAL")
    assert m.charset == ""


@pytest.mark.parametrize("term", ["\r", "\n", "\r\n"])
def test_terminators(term: str) -> None:
    text = ORM.to_er7().replace("\r", term)
    m = Message.parse(text.encode())
    assert m.get("OBR-18") == "ACC1001"
    assert len(m.segments()) == 9
    assert m.to_er7() == ORM.to_er7()


def test_msh1_msh2_numbering() -> None:
    assert ORM.get("MSH-1") == "|"
    assert ORM.get("MSH-2") == "^~\\&"
    assert ORM.get("MSH-3") == "RIS"
    assert ORM.get("MSH-9.2") == "O01"
    seg = ORM.segments("MSH")[0]
    assert seg.fields[1] == "|" and seg.fields[2] == "^~\\&" and seg.fields[10] == "ORM0001"


def test_fifth_encoding_character_any_version() -> None:
    m = Message.parse("MSH|^~\\&#|A|B|C|D|||ADT^A08|X1|P|2.3\rPID|1||1\\P\\2^^^H^MR||Doe#^J\r")
    assert m.encoding.truncation == "#"
    assert m.get("PID-3.1") == "1#2"
    assert m.get("PID-5.1") == "Doe#"  # a bare truncation character is data, kept as sent
    assert m.get("MSH-2") == "^~\\&#"


def test_custom_delimiters() -> None:
    m = Message.parse("MSH!@*$%!A!B!C!D!!!ADT@A08!X2!P!2.5\rPID!1!!77@@@H@MR*88@@@H@MR!!Roe@Ann$F$x\r")
    assert m.get("PID-3[2].1") == "88"
    assert m.get("PID-5.2") == "Ann!x"
    assert m.message_type == "ADT^A08"


def test_leading_junk_and_missing_trailing_terminator() -> None:
    m = Message.parse(b"\x0b\r\nMSH|^~\\&|A|B|C|D|||ADT^A08|X3|P|2.5\rPID|1")
    assert m.control_id == "X3"
    assert m.to_er7().endswith("PID|1\r")


def test_blank_segments_dropped() -> None:
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|X4|P|2.5\r\rPID|1||7\r\r\r")
    assert m.get("PID-3") == "7"
    assert [s.name for s in m.segments()] == ["MSH", "PID"]
    assert m.to_er7() == "MSH|^~\\&|A|B|C|D|||ADT^A08|X4|P|2.5\rPID|1||7\r"


def test_segment_name_must_match_exactly() -> None:
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|X5|P|2.5\rZPI|x\rPID\rPID|2\r")
    assert m.get("PID-1") == ""
    assert m.get("PID[2]-1") == "2"
    assert m.get_all("PID-1") == ["", "2"]


@pytest.mark.parametrize(
    "data, code, location, ack",
    [
        (b"", 100, "MSH", "AR"),
        (b"PID|1||x\r", 100, "MSH", "AR"),
        (b"MSH|^~\r", 102, "MSH-2", "AR"),
        (b"MSH|^~^&|A\r", 102, "MSH-2", "AR"),
        (b"MSH|^~\\&|A|B|C|D|||ADT^A08|1|P|2.5||||||8859/99\rPID|\xe9\r", 103, "MSH-18", "AE"),
    ],
)
def test_refused(data: bytes, code: int, location: str, ack: str) -> None:
    with pytest.raises(ProcessingError) as ei:
        Message.parse(data)
    assert (ei.value.code, ei.value.location, ei.value.ack_code) == (code, location, ack)


def test_repr_has_no_phi() -> None:
    r = repr(ORM)
    assert "ORM^O01" in r and "ORM0001" in r
    assert "Doe" not in r and "100234" not in r


# ------------------------------------------------------------------------------- charsets


def test_latin1_from_msh18() -> None:
    raw = (SAMPLES / "orm_latin1.hl7").read_bytes()
    assert "Müller".encode("latin-1") in raw
    m = Message.parse(raw)
    assert m.charset == "8859/1"
    assert m.get("PID-5.1") == "Müller"
    assert m.get("PV1-8.2") == "Weiß"


def test_utf8_declared_and_default() -> None:
    body = "MSH|^~\\&|A|B|C|D|||ADT^A08|U1|P|2.5||||||{cs}\rPID|1||1||Ñandú^José\r"
    assert Message.parse(body.format(cs="UNICODE UTF-8").encode()).get("PID-5.1") == "Ñandú"
    assert Message.parse(body.format(cs="").encode()).get("PID-5.2") == "José"
    assert Message.parse(body.format(cs="UNICODE").encode()).get("PID-5.2") == "José"


def test_8859_other_parts() -> None:
    body = "MSH|^~\\&|A|B|C|D|||ADT^A08|U2|P|2.5||||||8859/7\rPID|1||1||Αλφα\r"
    assert Message.parse(body.encode("iso8859-7")).get("PID-5") == "Αλφα"


def test_bad_bytes_are_processing_error() -> None:
    body = "MSH|^~\\&|A|B|C|D|||ADT^A08|U3|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller\r"
    with pytest.raises(ProcessingError) as ei:
        Message.parse(body.encode("latin-1"))
    assert (ei.value.code, ei.value.location, ei.value.ack_code) == (102, "MSH-18", "AE")
    with pytest.raises(ProcessingError):  # the channel's charset is not guessed either
        Message.parse(body.encode("latin-1"), charset="utf-8")
    guessed = Message.parse(body.replace("UNICODE UTF-8", "").encode("latin-1"))  # nothing declared
    assert guessed.charset_guessed and guessed.get("PID-5") == "Müller"


def test_charset_override_wins() -> None:
    body = "MSH|^~\\&|A|B|C|D|||ADT^A08|U4|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller\r"
    raw = body.encode("latin-1")
    assert Message.parse(raw, charset="8859/1").get("PID-5") == "Müller"
    assert Message.parse(raw, charset="latin-1").get("PID-5") == "Müller"
    with pytest.raises(ProcessingError):
        Message.parse(raw, charset="no-such-charset")


def test_codec_of_pure_ascii_message_follows_msh18() -> None:
    body = "MSH|^~\\&|A|B|C|D|||ADT^A08|U6|P|2.5||||||8859/1\rPID|1||1||Muller\r"
    assert Message.parse(body.encode()).codec == "latin-1"
    assert Message.parse(body).codec == "latin-1"
    assert Message.parse(body.replace("8859/1", "")).codec == "utf-8"
    assert Message.parse(body, charset="8859/15").codec == "iso8859-15"
    m = Message.parse(body)
    m.set("PID-5", "Müller")
    assert m.encode().endswith("M\xfcller\r".encode("latin-1"))


def test_msh18_repeated_uses_first() -> None:
    body = "MSH|^~\\&|A|B|C|D|||ADT^A08|U5|P|2.5||||||8859/1~UNICODE UTF-8\rPID|1||1||Müller\r"
    assert Message.parse(body.encode("latin-1")).get("PID-5") == "Müller"


# ---------------------------------------------------------------------------------- paths


def test_repetitions_and_star() -> None:
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|P1|P|2.5\rPID|1||11^^^A^MR~22^^^B&1.2&ISO^PI||X\r")
    assert m.get("PID-3") == "11^^^A^MR"
    assert m.get("PID-3[2].1") == "22"
    assert m.get("PID-3[2].4") == "B&1.2&ISO"  # composite: raw
    assert m.get("PID-3[2].4.1") == "B"
    assert m.get("PID-3[2].4.2") == "1.2"
    assert m.get("PID-3[3].1") == ""
    assert m.get_all("PID-3[*].1") == ["11", "22"]
    assert m.get_all("PID-3[*].4.1") == ["A", "B"]
    assert m.get("PID-3[*].1") == "11"
    assert m.components("PID-3[2]") == ["22", "", "", "B&1.2&ISO", "PI"]
    assert m.components("PID-3[2].4") == ["B", "1.2", "ISO"]
    assert m.components("PID-3[2].4.3") == ["ISO"]
    assert m.components("PID-9") == []
    assert m.get_all("PID-4[*]") == []


def test_segment_repetitions() -> None:
    m = load("oru_r01.hl7")
    assert m.get("OBX-5") == "CT head without contrast:"
    assert m.get("OBX[2]-5") == "No acute intracranial abnormality."
    assert m.get("OBX[3]-5") == "NORMAL^Normal^LOCAL"
    assert m.get("OBX[3]-5.2") == "Normal"
    assert m.get("OBX[4]-5") == ""
    assert m.get_all("OBX-1") == ["1", "2", "3"]
    assert m.get_all("OBX[2]-1") == ["2"]
    assert m.get("NTE-3") == "Compared with prior study of 2025&2026."


def test_absent_things_are_empty() -> None:
    assert ORM.get("ZZZ-1") == ""
    assert ORM.get("PID-99") == ""
    assert ORM.get("PID-5.9") == ""
    assert ORM.get("PID-5.1.2") == ""
    assert ORM.get("PID-8.2") == ""
    assert ORM.get("PID[2]-3") == ""
    assert ORM.get_all("ZZZ-1") == []


def test_compile_path() -> None:
    p = compile_path("PID-3[2].4.1")
    assert (p.segment, p.seg_rep, p.field, p.rep, p.component, p.subcomponent) == ("PID", None, 3, 2, 4, 1)
    q = compile_path("OBX[3]-5")
    assert (q.seg_rep, q.field) == (3, 5)
    assert compile_path("PID-3[*].1").rep == 0
    assert compile_path("PID-3") is compile_path("PID-3")  # cached
    assert ORM.get(compile_path("PID-3.1")) == "100234"


@pytest.mark.parametrize("bad", ["", "P-3", "PID-", "PID-x", "PID-3..1", "PID-3[0]", "PID-0", "PID-3.1.2.3", "PID 3"])
def test_bad_paths(bad: str) -> None:
    with pytest.raises(ValueError, match="HL7 path"):
        ORM.get(bad)


def test_escape_decoded_on_read_raw_for_composites() -> None:
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|E1|P|2.5\rNTE|1||a\\T\\b\\F\\c^x\\S\\y\r")
    assert m.get("NTE-3.1") == "a&b|c"
    assert m.get("NTE-3.2") == "x^y"
    assert m.get("NTE-3") == "a\\T\\b\\F\\c^x\\S\\y"
    assert m.components("NTE-3") == ["a&b|c", "x^y"]
    assert m.components("NTE-3.1") == ["a&b|c"]  # escaped & is not a subcomponent separator


def test_components_split_before_decoding() -> None:
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|E2|P|2.5\rPID|1||1||O\\S\\Brien~M\\T\\M&van^Anne\r")
    assert m.components("PID-5") == ["O^Brien"]
    assert m.components("PID-5[2]") == ["M\\T\\M&van", "Anne"]  # holds subcomponents: raw, like get()
    assert m.components("PID-5[2].1") == ["M&M", "van"]
    assert m.components("PID-5[2].1.1") == ["M&M"]


# --------------------------------------------------------------------------------- groups


def test_orm_two_orders() -> None:
    m = load("orm_o01_two_orders.hl7")
    orders = m.groups("ORDER")
    assert len(orders) == 2
    assert [g.get("ORC-2.1") for g in orders] == ["PL2001", "PL2002"]
    assert [g.get("OBR-18") for g in orders] == ["ACC2001", "ACC2002"]
    assert [g.get("OBR-24") for g in orders] == ["CR", "US"]
    assert orders[0].get("NTE-3") == ""  # the second order's note is not the first's
    assert orders[1].get("NTE-3") == "Fasting since midnight"
    # fallback to the message for segments the group does not hold
    assert orders[1].get("PID-3.1") == "100235"
    assert orders[0].get("MSH-10") == "ORM0002"
    assert [s.name for s in orders[1].segments()] == ["ORC", "OBR", "NTE"]
    assert orders[0].get("OBR-44") == "" and orders[1].get("OBR-44.1") == "USABD"


def test_orm_single_order_keeps_z_segment() -> None:
    (g,) = ORM.groups("order")
    assert [s.name for s in g.segments()] == ["ORC", "OBR", "NTE", "DG1", "ZDS"]
    assert g.get("ZDS-1.1") == "1.2.826.0.1.3680043.8.498.1001"
    assert g.get("AL1-3.2") == "Iodinated contrast media"  # patient-level: fallback


def test_omi_with_tq1_and_ipc() -> None:
    m = load("omi_o23.hl7")
    (g,) = m.groups("ORDER")
    assert [s.name for s in g.segments()] == ["ORC", "TQ1", "OBR", "IPC"]
    assert g.get("IPC-3") == "1.2.826.0.1.3680043.8.498.3001"
    assert g.get("IPC-9") == "MRI1"
    assert g.get("TQ1-7") == "202611251400"


def test_oru_groups_and_observations() -> None:
    m = load("oru_r01.hl7")
    (order,) = m.groups("ORDER")
    obs = order.groups("OBSERVATION")
    assert [o.get("OBX-1") for o in obs] == ["1", "2", "3"]
    assert obs[1].get("NTE-3") == "Compared with prior study of 2025&2026."
    assert [s.name for s in obs[1].segments()] == ["OBX", "NTE"]
    assert obs[2].get("OBX-5.1") == "NORMAL"
    assert obs[0].get("OBR-4.1") == "CTHEAD"  # falls back through the order group
    assert obs[0].get("PID-3.1") == "100234"  # ... and to the message
    assert len(m.groups("OBSERVATION")) == 3


def test_oru_without_orc_obr_starts_groups() -> None:
    text = (
        "MSH|^~\\&|A|B|C|D|||ORU^R01|R2|P|2.5\rPID|1||9\r"
        "OBR|1|||X1\rOBX|1|TX|||a\rOBR|2|||X2\rOBX|1|TX|||b\rOBX|2|TX|||c\rNTE|1||n\r"
    )
    m = Message.parse(text)
    groups = m.groups("ORDER")
    assert [g.get("OBR-4") for g in groups] == ["X1", "X2"]
    assert [len(g.groups("OBSERVATION")) for g in groups] == [1, 2]
    assert groups[1].get_all("OBX-5") == ["b", "c"]
    assert groups[1].get("OBX[2]-5") == "c"


def test_unknown_group_kind() -> None:
    with pytest.raises(ValueError):
        ORM.groups("PATIENT_VISIT")


# ---------------------------------------------------------------------- set and round trip


def test_set_field_component_subcomponent() -> None:
    m = load("orm_o01_ct.hl7")
    m.set("PID-5.1", "O'Brien|Smith")
    assert m.get("PID-5.1") == "O'Brien|Smith"
    assert "O'Brien\\F\\Smith" in m.to_er7()
    m.set("PID-3[2].4.2", "1.2.3")
    assert m.get("PID-3[2].4.2") == "1.2.3"
    assert m.get("PID-3") == "100234^^^HOSP^MR"
    m.set("OBR-18", "NEW1")
    assert m.get("OBR-18") == "NEW1"
    m.set("OBR-60", "far")
    assert m.get("OBR-60") == "far"
    m.set("ZXX-2", "created")
    assert m.segments()[-1].name == "ZXX"
    again = Message.parse(m.to_er7())
    assert again.get("PID-5.1") == "O'Brien|Smith"
    assert again.get("ZXX-2") == "created"
    assert again.get("PID-3[2].4.2") == "1.2.3"
    assert again.get("PID-5.2") == "Jane"


def test_set_raw_and_refusals() -> None:
    m = load("orm_o01_ct.hl7")
    m.set("PID-5", "Roe^Ann", raw=True)
    assert m.get("PID-5.2") == "Ann"
    with pytest.raises(ValueError):
        m.set("MSH-2", "^~\\&")
    with pytest.raises(ValueError):
        m.set("PID-3[*].1", "x")
    with pytest.raises(ValueError):
        m.set("OBX[3]-5", "x")


def test_set_in_group() -> None:
    m = load("orm_o01_two_orders.hl7")
    m.groups("ORDER")[1].set("OBR-18", "ACC9")
    assert m.get("OBR[2]-18") == "ACC9" and m.get("OBR-18") == "ACC2001"


def test_sample_round_trip_byte_exact() -> None:
    for path in SAMPLES.glob("*.hl7"):
        if path.name == "batch.hl7":
            continue
        raw = path.read_bytes()
        m = Message.parse(raw)
        assert m.encode() == raw, path.name


_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(_values)
def test_set_get_round_trip(value: str) -> None:
    m = Message.parse(ORM.to_er7())
    m.set("OBR-13", value)
    m.set("PID-5.2", value)
    m.set("PID-3[2].4.2", value)
    assert m.get("OBR-13") == value
    assert m.get("PID-5.2") == value
    assert m.get("PID-3[2].4.2") == value
    again = Message.parse(m.to_er7())
    assert again.get("PID-5.2") == value
    assert again.get("OBR-13") == value
    assert again.to_er7() == m.to_er7()
    assert again.get("PID-5.1") == "Doe"
    assert len(again.segments()) == 9


@given(st.lists(st.lists(st.text(alphabet="ab|^~\\&\r\n1", max_size=6), min_size=1, max_size=6), max_size=5))
def test_to_er7_round_trip(rows: list[list[str]]) -> None:
    m = Message.parse("MSH|^~\\&|A|B|C|D|||ADT^A08|RT|P|2.5\r")
    for r, row in enumerate(rows, start=1):
        for c, v in enumerate(row, start=1):
            m.set(f"ZRT[{r}]-{c}", v)
    text = m.to_er7()
    again = Message.parse(text)
    assert again.to_er7() == text
    for r, row in enumerate(rows, start=1):
        for c, v in enumerate(row, start=1):
            assert again.get(f"ZRT[{r}]-{c}") == v
