"""Split HL7 batch files (FHS/BHS ... BTS/FTS) and plain concatenations into single messages.

File sources hand whole files over; every message in them is then parsed and acknowledged on
its own, so the wrappers only matter for finding where messages start.
"""

from __future__ import annotations

import re

__all__ = ["split_batch", "split_batch_bytes"]

_WRAPPERS = ("FHS", "BHS", "BTS", "FTS")
_TERM = re.compile(r"\r\n|\n|\r")
_TERM_B = re.compile(rb"\r\n|\n|\r")


def split_batch(text: str) -> list[str]:
    """Messages in a batch or concatenation, each as ER7 with CR terminators; wrappers dropped."""
    out: list[list[str]] = []
    for seg in _TERM.split(text.lstrip("\ufeff")):
        seg = seg.strip("\x0b\x1c")
        if not seg.strip():
            continue
        head = seg[:3]
        if head in _WRAPPERS:
            continue
        if head == "MSH":
            out.append([seg])
        elif out:
            out[-1].append(seg)
        # segments before the first MSH belong to no message: dropped
    return ["\r".join(m) + "\r" for m in out]


def split_batch_bytes(data: bytes, *, orphans: bool = False) -> list[bytes]:
    """The same on bytes, so that each message is decoded with its own MSH-18.

    With `orphans`, segments before the first MSH are kept as a unit of their own (which will not
    parse), so that a listener stores and refuses them rather than dropping them silently."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out: list[list[bytes]] = []
    for seg in _TERM_B.split(data):
        seg = seg.strip(b"\x0b\x1c")
        if not seg.strip():
            continue
        head = seg[:3]
        if head in (b"FHS", b"BHS", b"BTS", b"FTS"):
            continue
        if head == b"MSH":
            out.append([seg])
        elif out:
            out[-1].append(seg)
        elif orphans:
            out.append([seg])
    return [b"\r".join(m) + b"\r" for m in out]
