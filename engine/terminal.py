"""Message content made safe for an operator's terminal.

A stored message is whatever a sender put on the wire: an ESC sequence in PID-5 could retitle the
window, move the cursor, hide lines or, on some terminals, answer back with keystrokes. Everything
the CLI prints from a message goes through `terminal_text`, which shows control characters and
undecodable bytes as visible tags instead: `<ESC>`, `<NUL>`, `<U+009B>` (C1), `<U+202E>` (bidi
overrides), `<0xFF>` (a byte that is not UTF-8). Segment breaks may be kept as line breaks.
"""

from __future__ import annotations

_C0_NAMES = ("NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM "
             "SUB ESC FS GS RS US").split()


def _table(keep: str) -> dict[int, str]:
    table: dict[int, str] = {c: f"<{name}>" for c, name in enumerate(_C0_NAMES)}
    table[0x7F] = "<DEL>"
    table.update({c: f"<U+{c:04X}>" for c in range(0x80, 0xA0)})  # C1: 0x9B is a one-byte CSI
    # bidi embeddings, overrides and isolates reorder what follows; line/paragraph separators break lines
    table.update({c: f"<U+{c:04X}>" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)})
    table.update({c: f"<0x{c - 0xDC00:02X}>" for c in range(0xDC80, 0xDD00)})  # surrogateescape'd bytes
    for ch in keep:
        table.pop(ord(ch), None)
    return table


_LINE = _table("\t")
_BLOCK = _table("\t\n")


def terminal_text(value: str | bytes | None, *, lines: bool = False) -> str:
    """`value` with nothing a terminal would act on. With `lines`, CR, LF and CRLF (HL7 segment
    breaks) become line breaks; without, they are tagged like any other control character."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if lines:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
        return value.translate(_BLOCK)
    return value.translate(_LINE)
