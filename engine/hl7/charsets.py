"""HL7 table 0211 character set names -> Python codecs.

A channel may override MSH-18 with either an HL7 name ("8859/1") or a Python codec name
("latin-1"), because senders often declare one charset and send another. `decode_message` turns
received bytes into text: the channel's charset, else MSH-18, else UTF-8, and when bytes that
declare nothing are not UTF-8 either, Windows-1252 (what such senders nearly always mean).
"""

from __future__ import annotations

import codecs

from engine.errors import DATA_TYPE_ERROR, TABLE_VALUE_NOT_FOUND, ProcessingError

__all__ = ["FALLBACK_CODEC", "HL7_CHARSETS", "decode_message", "python_codec", "resolve_charset"]

# Undeclared bytes that are not UTF-8: cp1252 (Latin-1 plus the 0x80-0x9F letters Windows senders
# use, such as the euro sign and curly quotes); Latin-1 for the five bytes cp1252 leaves undefined.
FALLBACK_CODEC = "cp1252"

HL7_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE": "utf-8",  # formally UCS; on the wire it is UTF-8 in every system we know
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "ISO IR6": "ascii",
    "ISO IR14": "shift_jis",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "ISO IR100": "latin-1",  # DICOM term, seen from senders that speak both
    "ISO IR192": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "CNS 11643-1992": "big5",
    "WINDOWS-1252": "cp1252",
}


def python_codec(name: str) -> str | None:
    """Python codec for an HL7 (or Python) charset name; None when unknown."""
    key = " ".join(name.strip().upper().replace("_", " ").split())
    if not key:
        return None
    hit = HL7_CHARSETS.get(key)
    if hit:
        return hit
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        return None


def resolve_charset(name: str) -> str:
    """Python codec for an HL7/Python charset name; ProcessingError (103 at MSH-18) when unknown."""
    codec = python_codec(name)
    if codec is None:
        raise ProcessingError(f"unknown character set {name[:40]!r}", TABLE_VALUE_NOT_FOUND, "MSH-18")
    return codec


_BOM = b"\xef\xbb\xbf"
_LEAD_BYTES = b"\x0b \t\r\n"


def _msh18_from_bytes(data: bytes) -> str:
    """Read MSH-18 (first repetition) from raw bytes before decoding: delimiters are ASCII."""
    end = len(data)
    for t in (b"\r", b"\n"):
        i = data.find(t, 0, end)
        if i >= 0:
            end = i
    head = data[:end]
    if not head.startswith(b"MSH") or len(head) < 8:
        return ""
    fs = head[3:4]
    parts = head.split(fs)
    if len(parts) < 18:
        return ""
    value = parts[17]
    rs = parts[1][1:2]
    if rs:
        value = value.split(rs)[0]
    return value.decode("ascii", "replace").strip()


def decode_message(data: bytes, charset: str | None) -> tuple[str, str | None, bool]:
    """Bytes -> (text, Python codec used, guessed: True when nothing declared it and UTF-8 failed).

    The codec is None for pure ASCII with no charset given: the text is the same in every charset
    we accept, so MSH-18 is looked up only if someone asks (Message.codec). A UTF-8 byte order
    mark (at the start, or after leading whitespace or a stray MLLP start byte) is dropped and
    means UTF-8 unless the channel says otherwise. A declared charset (channel, MSH-18, BOM) that
    the bytes do not fit is refused, never second-guessed.
    """
    bom = False
    if data[:1] in (b"\x0b", b" ", b"\t", b"\r", b"\n") or data[:3] == _BOM:
        data = data.lstrip(_LEAD_BYTES)
        if data[:3] == _BOM:
            data, bom = data[3:], True
    if charset is not None:
        codec, where = resolve_charset(charset), f"channel charset {charset!r}"
    elif bom:
        codec, where = "utf-8", "UTF-8 byte order mark"
    else:
        if b"\x1b" not in data:
            try:  # pure ASCII reads the same in every charset we accept: skip the MSH-18 scan
                return data.decode("ascii"), None, False
            except UnicodeDecodeError:
                pass
        declared = _msh18_from_bytes(data)
        if not declared:  # UTF-8 by default; else what undeclared 8-bit senders nearly always mean
            try:
                return data.decode("utf-8"), "utf-8", False
            except UnicodeDecodeError:
                pass
            try:
                return data.decode(FALLBACK_CODEC), FALLBACK_CODEC, True
            except UnicodeDecodeError:
                return data.decode("latin-1"), "latin-1", True
        codec, where = resolve_charset(declared), f"MSH-18 {declared!r}"
    try:
        return data.decode(codec), codec, False
    except UnicodeDecodeError as e:
        raise ProcessingError(
            f"bytes at offset {e.start} are not valid {codec} ({where})", DATA_TYPE_ERROR, "MSH-18", ack_code="AE"
        ) from None
