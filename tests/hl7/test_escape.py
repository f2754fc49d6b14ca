from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.hl7.er7 import Encoding
from engine.hl7.escape import escape, unescape

ENC = Encoding()
ENC5 = Encoding("|", "^", "~", "\\", "&", "#")


def test_escape_each_delimiter() -> None:
    assert escape("a|b^c~d\\e&f", ENC) == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f"


def test_unescape_each_sequence() -> None:
    assert unescape("a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f", ENC) == "a|b^c~d\\e&f"


def test_hex_and_formatting() -> None:
    assert unescape("x\\X41\\y", ENC) == "xAy"
    assert unescape("line1\\.br\\line2", ENC) == "line1\nline2"
    assert unescape("\\XC3A9\\", ENC) == "é"  # UTF-8 bytes
    assert unescape("\\XE9\\", ENC, "latin-1") == "é"
    assert unescape("\\H\\bold\\N\\", ENC) == "bold"


def test_unknown_or_broken_sequences_kept() -> None:
    assert unescape("\\Q\\", ENC) == "\\Q\\"
    assert unescape("a\\b", ENC) == "a\\b"
    assert unescape("\\Xzz\\", ENC) == "\\Xzz\\"


def test_truncation_character() -> None:
    assert escape("a#b", ENC5) == "a\\P\\b"
    assert unescape("a\\P\\b", ENC5) == "a#b"
    assert escape("a#b", ENC) == "a#b"


def test_custom_delimiters() -> None:
    enc = Encoding("!", "@", "*", "$", "%")
    assert escape("a!b@c$", enc) == "a$F$b$S$c$E$"
    assert unescape("a$F$b$S$c$E$", enc) == "a!b@c$"


def test_cr_lf_never_written_raw() -> None:
    out = escape("a\r\nb", ENC)
    assert "\r" not in out and "\n" not in out
    assert unescape(out, ENC) == "a\r\nb"


@given(st.text())
def test_round_trip(value: str) -> None:
    assert unescape(escape(value, ENC), ENC) == value
    assert unescape(escape(value, ENC5), ENC5) == value
