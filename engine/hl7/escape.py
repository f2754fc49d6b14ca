"""HL7 v2 escape sequences: decoded on read, encoded on write.

Kept apart from the message view so that ACK building and mappings can escape text without
parsing anything. Both directions take a fast path when the text holds nothing to change, which
is nearly always on the hot path.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.hl7.er7 import Encoding

__all__ = ["escape", "unescape"]


@lru_cache(maxsize=64)
def _tables(fs: str, cs: str, rs: str, es: str, ss: str, tc: str | None) -> tuple[dict[int, str], re.Pattern[str]]:
    """Translation table for escaping and the pattern that finds escape sequences (per encoding)."""
    table = {
        ord(es): f"{es}E{es}",
        ord(fs): f"{es}F{es}",
        ord(cs): f"{es}S{es}",
        ord(rs): f"{es}R{es}",
        ord(ss): f"{es}T{es}",
        # CR/LF would end the segment: carry them as hex (LF as the formatting break senders know)
        ord("\r"): f"{es}X0D{es}",
        ord("\n"): f"{es}.br{es}",
    }
    if tc:
        table[ord(tc)] = f"{es}P{es}"
    e = re.escape(es)
    return table, re.compile(f"{e}([^{e}\r]*){e}")


def _tables_for(enc: Encoding) -> tuple[dict[int, str], re.Pattern[str]]:
    return _tables(enc.field, enc.component, enc.repetition, enc.escape, enc.subcomponent, enc.truncation)


def escape(text: str, enc: Encoding) -> str:
    """Encode delimiters (and CR/LF) in a plain value so it can be written into a field."""
    table, _ = _tables_for(enc)
    out = text.translate(table)
    return out


def _hex(body: str, charset: str) -> str | None:
    """Decode the hex digits of a \\Xhh..\\ sequence; None if they are not hex."""
    try:
        raw = bytes.fromhex(body)
    except ValueError:
        return None
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return raw.decode("latin-1")


def unescape(text: str, enc: Encoding, charset: str = "utf-8") -> str:
    """Decode escape sequences in a field value; unknown or malformed sequences are kept as written.

    `charset` decodes the bytes of \\Xhh\\ sequences (falls back to Latin-1 when they do not fit).
    Highlighting (\\H\\, \\N\\) is dropped; \\.br\\ becomes a newline, \\.sp\\ a newline too.
    """
    es = enc.escape
    if es not in text:
        return text
    _, pattern = _tables_for(enc)
    singles = {
        "F": enc.field,
        "S": enc.component,
        "T": enc.subcomponent,
        "R": enc.repetition,
        "E": es,
        "H": "",
        "N": "",
        ".br": "\n",
        ".sp": "\n",
    }
    if enc.truncation:
        singles["P"] = enc.truncation

    def repl(m: re.Match[str]) -> str:
        body = m.group(1)
        hit = singles.get(body)
        if hit is not None:
            return hit
        if body[:1] == "X" and len(body) > 1:
            dec = _hex(body[1:], charset)
            if dec is not None:
                return dec
        if body[:3] in (".sp", ".in", ".ti", ".sk") or body in (".fi", ".nf", ".ce"):
            return "\n" if body[:3] == ".sp" else ""
        return m.group(0)

    return pattern.sub(repl, text)
