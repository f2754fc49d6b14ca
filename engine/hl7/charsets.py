"""HL7 table 0211 character set names -> Python codecs, through an allowlist of text encodings.

A channel may override MSH-18 with either an HL7 name ("8859/1") or a common alias ("latin-1",
"windows-1252"), because senders often declare one charset and send another. Only real text
encodings are accepted: Python's codec registry also knows `base64`, `rot13`, `zlib`, `hex`,
`idna`, `unicode_escape` ..., which are byte or string transforms, not charsets; a message that
names one must be refused with an answer, not decoded with it (and an ACK can never be encoded
with it).

`decode_message` turns received bytes into text: the channel's charset, else MSH-18, else UTF-8,
and when bytes that declare nothing are not UTF-8 either, Windows-1252 (what such senders nearly
always mean).
"""

from __future__ import annotations

import codecs
from functools import lru_cache

from engine.errors import DATA_TYPE_ERROR, TABLE_VALUE_NOT_FOUND, ProcessingError

__all__ = [
    "FALLBACK_CODEC",
    "HL7_CHARSETS",
    "TEXT_CODECS",
    "ascii_compatible",
    "decode_message",
    "hl7_name",
    "python_codec",
    "resolve_charset",
]

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
    "8859/10": "iso8859-10",
    "8859/11": "iso8859-11",
    "8859/13": "iso8859-13",
    "8859/14": "iso8859-14",
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

# Python codecs (by their canonical codecs.lookup() name) a message may be decoded with: the
# targets above plus the usual aliases' targets. Anything else, however Python spells it, is refused.
TEXT_CODECS: frozenset[str] = frozenset(
    {codecs.lookup(c).name for c in HL7_CHARSETS.values()}
    | {f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)}
    | {f"cp{n}" for n in range(1250, 1259)}
    | {
        "utf-8",
        "utf-8-sig",
        "utf-16",
        "utf-16-le",
        "utf-16-be",
        "utf-32",
        "utf-32-le",
        "utf-32-be",
        "shift_jis",
        "cp932",
        "euc_jp",
        "iso2022_jp",
        "iso2022_jp_2",
        "gb2312",
        "gbk",
        "gb18030",
        "euc_kr",
        "cp949",
        "big5",
        "big5hkscs",
        "koi8-r",
        "koi8-u",
        "cp437",
        "cp850",
    }
)

# the HL7 name an ACK states in MSH-18 for the codec it is written in
_HL7_NAME: dict[str, str] = {
    "ascii": "ASCII",
    "iso8859-1": "8859/1",
    "utf-8": "UNICODE UTF-8",
    "utf-16": "UNICODE UTF-16",
    "utf-32": "UNICODE UTF-32",
    **{f"iso8859-{n}": f"8859/{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15)},
    "shift_jis": "ISO IR14",
    "iso2022_jp": "ISO IR87",
    "iso2022_jp_2": "ISO IR159",
    "gb18030": "GB 18030-2000",
    "euc_kr": "KS X 1001",
    "big5": "BIG-5",
}

_ASCII_SAMPLE = "".join(chr(c) for c in range(0x20, 0x7F)) + "\r"


@lru_cache(maxsize=256)
def python_codec(name: str) -> str | None:
    """Python codec for an HL7 name or a text-encoding alias; None when unknown or not a charset."""
    key = " ".join(name.strip().upper().replace("_", " ").split())
    if not key:
        return None
    hit = HL7_CHARSETS.get(key)
    if hit:
        return hit
    try:
        canonical = codecs.lookup(name.strip()).name
    except (LookupError, ValueError, TypeError):  # ValueError: a NUL in the name
        return None
    return canonical if canonical in TEXT_CODECS else None


@lru_cache(maxsize=64)
def ascii_compatible(codec: str) -> bool:
    """True when printable ASCII and CR encode to the same bytes as in ASCII (not UTF-16/32)."""
    try:
        return _ASCII_SAMPLE.encode(codec) == _ASCII_SAMPLE.encode("ascii")
    except (LookupError, UnicodeError, TypeError, ValueError):
        return False


def hl7_name(codec: str) -> str:
    """HL7 table 0211 name of a Python codec ('' when HL7 has none, e.g. cp1252)."""
    try:
        return _HL7_NAME.get(codecs.lookup(codec).name, "")
    except LookupError:
        return ""


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
