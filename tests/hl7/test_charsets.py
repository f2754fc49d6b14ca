"""The charset allowlist and the ACK builders that must answer whatever the header holds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ProcessingError
from engine.hl7.ack import ack_codec, build_ack, build_ack_from_raw, busy_ack, check_charset, minimal_ack
from engine.hl7.charsets import ascii_compatible, python_codec
from engine.hl7.er7 import Message


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("ASCII", "ascii"),
        ("8859/1", "latin-1"),
        ("8859/15", "iso8859-15"),
        ("ISO IR14", "shift_jis"),
        ("ISO IR87", "iso2022_jp"),
        ("ISO IR159", "iso2022_jp_2"),
        ("GB 18030-2000", "gb18030"),
        ("KS X 1001", "euc_kr"),
        ("CNS 11643-1992", "big5"),
        ("BIG-5", "big5"),
        ("UNICODE", "utf-8"),
        ("UNICODE UTF-8", "utf-8"),
        ("unicode utf-16", "utf-16"),
        ("UNICODE UTF-32", "utf-32"),
        ("UTF-8", "utf-8"),
        ("ISO-8859-1", "iso8859-1"),
        ("latin-1", "iso8859-1"),
        ("windows-1252", "cp1252"),
        ("cp1252", "cp1252"),
    ],
)
def test_table_0211_names_and_aliases(name: str, codec: str) -> None:
    assert python_codec(name) == codec


@pytest.mark.parametrize(
    "name", ["base64", "rot13", "zlib", "hex", "idna", "punycode", "unicode_escape", "uu", "bz2", "quopri", "x\x00", ""]
)
def test_codecs_that_are_no_charset_are_refused(name: str) -> None:
    assert python_codec(name) is None


def test_ascii_compatibility() -> None:
    assert ascii_compatible("latin-1") and ascii_compatible("utf-8") and ascii_compatible("shift_jis")
    assert not ascii_compatible("utf-16") and not ascii_compatible("utf-32")


def test_check_charset_refuses_a_bogus_msh18_unless_overridden() -> None:
    msg = Message.parse(b"MSH|^~\\&|A|B|C|D|2025||ORM^O01|1|P|2.5||||||rot13\r")
    with pytest.raises(ProcessingError) as exc:
        check_charset(msg)
    assert exc.value.location == "MSH-18" and exc.value.code == 103
    check_charset(msg, "8859/1")  # the channel's override wins
    assert ack_codec(msg) == "ascii"


def test_busy_and_minimal_acks_name_the_message() -> None:
    ack = Message.parse(busy_ack(b"MSH|^~\\&|RIS|H|E|H|2025||ORM^O01|C-1|P|2.5\rPID|||DOE"))
    assert (ack.get("MSA-1"), ack.get("MSA-2"), ack.get("ERR-3.1")) == ("AR", "C-1", "207")
    assert "engine busy" in ack.get("MSA-3")
    plain = Message.parse(minimal_ack("AR", None, "ID|with^delims"))
    assert plain.get("MSA-2") == "IDwithdelims"


@settings(max_examples=300, derandomize=True)
@given(head=st.sampled_from([b"MSH", b"MSH|", b"MSH|^~\\&|", b"\x0bMSH", b""]), rest=st.binary(max_size=200))
def test_an_ack_from_raw_bytes_never_raises_and_always_parses(head: bytes, rest: bytes) -> None:
    text = build_ack_from_raw(head + rest, "AR", ProcessingError("refused", 102, "MSH-2", ack_code="AR"))
    if text is None:
        return
    ack = Message.parse(text.encode("latin-1", errors="replace"), charset="latin-1")  # fields echoed byte for byte
    assert ack.get("MSA-1") == "AR" and ack.get("MSH-9.1") == "ACK"


@settings(max_examples=200, derandomize=True)
@given(fields=st.lists(st.text(alphabet=st.characters(blacklist_characters="|\r\n\x0b\x1c"), max_size=12), max_size=20))
def test_build_ack_echoes_any_parsed_header(fields: list[str]) -> None:
    try:
        msg = Message.parse("MSH|^~\\&|" + "|".join(fields) + "\r")
    except ProcessingError:
        return
    ack = Message.parse(build_ack(msg, "AA"))
    assert ack.get("MSA-1") == "AA"
