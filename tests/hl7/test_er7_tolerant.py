"""Message.parse reads what senders really send: BOMs, any line ends, padded MSH codes, undeclared Latin-1."""

from __future__ import annotations

import pytest

from engine.errors import ProcessingError, ProcessingWarning
from engine.hl7.er7 import Message

SEGMENTS = [
    "MSH|^~\\&|EPIC|EPIC HOSP|PACS|RAD|20261124083000||ORM^O01|T1|P|2.3",
    "PID|1||E1^^^EPI^MR||TEST^ALPHA",
    "ORC|NW|P1",
    "OBR|1|P1||CT1^CT HEAD||||||||||||||ACC1",
    "ZDS|1.2.3.4^EPIC^Application^DICOM",
]
TEXT = "\r".join(SEGMENTS) + "\r"


def names(m: Message) -> list[str]:
    return [s.name for s in m.segments()]


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf" + TEXT.encode(),  # BOM from a UTF-8 editor
        b"\x0b\xef\xbb\xbf" + TEXT.encode(),  # BOM inside the MLLP frame
        b"\r\n\xef\xbb\xbf" + TEXT.encode(),  # after a blank line
        b"\xef\xbb\xbf\r\n" + TEXT.encode(),  # BOM, then a blank line
        "\ufeff" + TEXT,  # already decoded
        b"\r\n\r\n  \t" + TEXT.encode(),  # blank lines and indentation before MSH
    ],
)
def test_junk_before_msh(data: bytes | str) -> None:
    m = Message.parse(data)
    assert m.control_id == "T1" and names(m) == ["MSH", "PID", "ORC", "OBR", "ZDS"]
    assert m.to_er7() == TEXT
    assert not m.charset_guessed


def test_bom_means_utf8() -> None:
    m = Message.parse(b"\xef\xbb\xbf" + TEXT.replace("TEST^ALPHA", "Ñandú^José").encode())
    assert m.get("PID-5.1") == "Ñandú" and m.codec == "utf-8" and not m.charset_guessed


@pytest.mark.parametrize("ends", [("\n",) * 5, ("\r\n",) * 5, ("\r", "\n", "\r\n", "\n\r", "\r\n\r\n")])
def test_mixed_line_ends(ends: tuple[str, ...]) -> None:
    text = "".join(s + e for s, e in zip(SEGMENTS, ends, strict=True))
    m = Message.parse(text.encode())
    assert names(m) == ["MSH", "PID", "ORC", "OBR", "ZDS"]
    assert m.to_er7() == TEXT
    (order,) = m.groups("ORDER")
    assert order.get("ZDS-1.1") == "1.2.3.4"


def test_padded_msh_codes() -> None:
    text = TEXT.replace("ORM^O01|", "ORM ^O01\t|").replace("|P|2.3\r", "|P |2.3 \t\r")
    m = Message.parse(text.encode())
    assert (m.message_type, m.trigger, m.version, m.processing_id) == ("ORM^O01", "O01", "2.3", "P")
    assert m.get("MSH-12") == "2.3" and m.get("MSH-9.1") == "ORM"
    assert m.sending_facility == "EPIC HOSP"  # spaces inside other MSH fields are the sender's
    assert m.to_er7().split("\r")[0] == SEGMENTS[0]
    v25 = Message.parse("MSH|^~\\&|A|B|C|D|||OMI^O23^OMI_O23 |X1|P|2.5.1 ^ |||AL |NE \rPID|1\r")
    assert (v25.structure, v25.version, v25.accept_ack_type, v25.application_ack_type) == (
        "OMI_O23", "2.5.1", "AL", "NE"
    )
    assert v25.get("MSH-12") == "2.5.1^"  # the (empty) second component stays


def test_undeclared_latin1_is_read_as_cp1252_and_says_so() -> None:
    body = TEXT.replace("TEST^ALPHA", "Müller^Jürgen").replace("CT HEAD", "Schädel nativ")
    m = Message.parse(body.encode("latin-1"))
    assert m.get("PID-5.1") == "Müller" and m.get("OBR-4.2") == "Schädel nativ"
    assert m.charset_guessed and m.codec == "cp1252"
    (w,) = m.warnings
    assert isinstance(w, ProcessingWarning) and w.location == "MSH-18"
    assert "Müller" not in w.text and "cp1252" in w.text
    assert m.encode() == body.encode("latin-1")  # the ACK goes back the way it came


def test_windows_1252_letters_and_undefined_bytes() -> None:
    body = TEXT.replace("TEST^ALPHA", "O\x92Neil^Zo\xeb").replace("CT HEAD", "Preis \x80 5")
    m = Message.parse(body.encode("latin-1"))
    assert m.get("PID-5.1") == "O\u2019Neil" and m.get("PID-5.2") == "Zoë" and m.get("OBR-4.2") == "Preis € 5"
    odd = Message.parse(TEXT.replace("TEST", "A\x81B").encode("latin-1"))  # 0x81: not cp1252
    assert odd.charset_guessed and odd.codec == "latin-1" and odd.get("PID-5.1") == "A\x81B"


def test_nothing_guessed_when_utf8_ascii_or_declared() -> None:
    utf8 = Message.parse(TEXT.replace("TEST", "Müller").encode())
    assert utf8.get("PID-5.1") == "Müller" and not utf8.charset_guessed and utf8.warnings == []
    ascii_only = Message.parse(TEXT.encode())
    assert not ascii_only.charset_guessed and ascii_only.warnings == []
    declared = TEXT.replace("|P|2.3\r", "|P|2.3||||||8859/1\r").replace("TEST", "Müller").encode("latin-1")
    m = Message.parse(declared)
    assert m.codec == "latin-1" and not m.charset_guessed and m.get("PID-5.1") == "Müller"


def test_declared_or_configured_charset_is_not_second_guessed() -> None:
    wrong = TEXT.replace("|P|2.3\r", "|P|2.3||||||UNICODE UTF-8\r").replace("TEST", "Müller").encode("latin-1")
    with pytest.raises(ProcessingError) as ei:
        Message.parse(wrong)
    assert (ei.value.code, ei.value.location) == (102, "MSH-18")
    latin1 = TEXT.replace("TEST", "Müller").encode("latin-1")
    with pytest.raises(ProcessingError):
        Message.parse(latin1, charset="UNICODE UTF-8")
    forced = Message.parse(latin1, charset="8859/1")  # the channel's override still wins
    assert forced.get("PID-5.1") == "Müller" and forced.codec == "latin-1" and not forced.charset_guessed
    assert Message.parse(wrong, charset="latin-1").get("PID-5.1") == "Müller"


def test_bytearray_and_memoryview() -> None:
    raw = TEXT.replace("TEST", "Müller").encode("latin-1")
    for data in (bytearray(raw), memoryview(raw)):
        m = Message.parse(data)
        assert m.get("PID-5.1") == "Müller" and m.charset_guessed
    assert Message.parse(bytearray(TEXT.encode())).codec == "utf-8"
