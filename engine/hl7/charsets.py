"""HL7 table 0211 character set names -> Python codecs.

A channel may override MSH-18 with either an HL7 name ("8859/1") or a Python codec name
("latin-1"), because senders often declare one charset and send another.
"""

from __future__ import annotations

import codecs

__all__ = ["python_codec", "HL7_CHARSETS"]

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
