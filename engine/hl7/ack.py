"""HL7 acknowledgements (original AA/AE/AR and enhanced CA/CE/CR) built as plain strings.

One place turns a ProcessingError into MSA + ERR so that every layer only has to raise.
Building is string concatenation (no hl7apy) because an ACK goes out for every message.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from engine.errors import ProcessingError, ProcessingWarning
from engine.hl7.er7 import DEFAULT_ENCODING, Encoding, Message, compile_path
from engine.hl7.escape import escape

__all__ = ["AckMode", "ack_mode", "build_ack", "build_ack_from_raw", "erl", "new_control_id", "should_send"]

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

# HL7 table 0357 texts for ERR-3.2
TABLE_0357 = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

_counter = itertools.count()
_PID = os.getpid() % 100


def new_control_id() -> str:
    """Unique MSH-10 for an ACK: milliseconds + process + counter (19 chars, fits ST 20)."""
    return f"{int(time.time() * 1000):013d}{_PID:02d}{next(_counter) % 10000:04d}"


def _now() -> str:
    return datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z")


class AckMode(NamedTuple):
    """MSH-15 (accept/commit) and MSH-16 (application) acknowledgement types."""

    commit: str
    application: str

    @property
    def original(self) -> bool:
        """True when both are empty: HL7 original acknowledgement mode (one AA/AE/AR)."""
        return not self.commit and not self.application


def ack_mode(msg: Message) -> AckMode:
    """MSH-15/MSH-16 with HL7 defaults: both empty -> original mode ('', ''); else an empty one means AL."""
    commit = msg.accept_ack_type.strip().upper()
    app = msg.application_ack_type.strip().upper()
    if not commit and not app:
        return AckMode("", "")
    return AckMode(commit or "AL", app or "AL")


def should_send(mode: str, success: bool) -> bool:
    """Whether an enhanced-mode ack of this type (AL, NE, ER, SU) is sent for this outcome."""
    mode = (mode or "AL").upper()
    if mode == "NE":
        return False
    if mode == "ER":
        return not success
    if mode == "SU":
        return success
    return True


_LOC_RE = re.compile(r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?$")


def erl(location: str, enc: Encoding = DEFAULT_ENCODING) -> str:
    """ERR-2 (ERL) from a location such as 'ORC-7.4' -> 'ORC^1^7^1^4'; '' when it is not a path."""
    loc = location.strip().upper()
    if not loc:
        return ""
    try:
        p = compile_path(loc)
    except ValueError:
        m = _LOC_RE.match(loc)
        return f"{m.group(1)}{enc.component}{m.group(2) or 1}" if m else ""
    parts = [p.segment, str(p.seg_rep or 1)]
    if p.field is not None:
        parts += [str(p.field), str(p.rep or 1)]
        if p.component is not None:
            parts.append(str(p.component))
            if p.subcomponent is not None:
                parts.append(str(p.subcomponent))
    return enc.component.join(parts)


def _clean(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")


def _version_lt_25(version: str) -> bool:
    try:
        nums = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return nums < (2, 5)


def _build(
    h: dict[str, str],
    enc: Encoding,
    code: str,
    error: ProcessingError | None,
    control_id: str | None,
    warnings: Sequence[ProcessingWarning] = (),
) -> str:
    code = code.upper()
    if code not in ACK_CODES:
        raise ValueError(f"unknown acknowledgement code {code!r}")
    fs, cs = enc.field, enc.component
    trig = h.get("trigger", "")
    msh = [
        "MSH",
        enc.msh2,
        h.get("MSH-5", ""),
        h.get("MSH-6", ""),
        h.get("MSH-3", ""),
        h.get("MSH-4", ""),
        _now(),
        "",
        f"ACK{cs}{trig}{cs}ACK" if trig else f"ACK{cs}{cs}ACK",
        escape(control_id or new_control_id(), enc),
        h.get("MSH-11", "") or "P",
        h.get("MSH-12", "") or "2.5",
    ]
    if h.get("MSH-18"):
        msh += ["", "", "", "", "", h["MSH-18"]]
    text = error.text if error is not None else ""
    msa = ["MSA", code, h.get("MSH-10", ""), escape(text[:80], enc) if text else ""]
    while msa[-1] == "":
        msa.pop()
    segs = [fs.join(_clean(x) for x in msh), fs.join(msa)]
    old_version = _version_lt_25(h.get("MSH-12.1", ""))
    if error is not None:
        segs.append(_err(enc, error.code, error.location, text, "E", old_version))
    for w in warnings:  # HL7 v2.5 ERR-4 severity W: accepted, but this value was dropped or cut
        segs.append(_err(enc, w.code, w.location, w.text, "W", old_version))
    return "\r".join(segs) + "\r"


def _err(enc: Encoding, code: int, location: str, text: str, severity: str, old_version: bool) -> str:
    cs = enc.component
    ecode = int(code) if str(code).isdigit() else 207
    loc = erl(location, enc)
    cwe = cs.join([str(ecode), escape(TABLE_0357.get(ecode, "Application error"), enc), "HL70357"])
    err1 = ""
    if old_version:  # v2.3/2.4 receivers read ERR-1 (ELD) only
        eld = loc.split(cs)[:3] if loc else ["", "", ""]
        eld += [""] * (3 - len(eld))
        err1 = cs.join(eld + [cwe.replace(cs, enc.subcomponent)])
    return enc.field.join(["ERR", err1, loc, cwe, severity, "", "", "", escape(text, enc)])


def build_ack(
    msg: Message,
    code: str,
    error: ProcessingError | None = None,
    *,
    control_id: str | None = None,
    warnings: Sequence[ProcessingWarning] = (),
) -> str:
    """ACK for msg: sender/receiver swapped, same version, MSA-2 = its MSH-10, ERR from `error`."""
    enc = msg.encoding
    f = msg._first_fields("MSH") or []

    def raw(n: int) -> str:
        return f[n] if n < len(f) else ""

    h = {
        k: raw(n)
        for k, n in (
            ("MSH-3", 3),
            ("MSH-4", 4),
            ("MSH-5", 5),
            ("MSH-6", 6),
            ("MSH-10", 10),
            ("MSH-11", 11),
            ("MSH-12", 12),
            ("MSH-18", 18),
        )
    }
    h["trigger"] = escape(msg.trigger, enc)
    h["MSH-12.1"] = msg.version
    return _build(h, enc, code, error, control_id, warnings)


def build_ack_from_raw(raw: bytes, code: str, error: ProcessingError | None) -> str | None:
    """Best-effort ACK when Message.parse failed: read MSH naively, default delimiters if MSH-2 is bad."""
    text = raw.decode("latin-1").lstrip("\ufeff\x0b \t\r\n")
    if text.startswith("\xef\xbb\xbf"):
        text = text[3:]
    if not text.startswith("MSH") or len(text) < 4:
        return None
    line = re.split(r"[\r\n]", text, maxsplit=1)[0]
    fs = line[3]
    if fs.isalnum() or fs.isspace():
        fs = "|"
    parts = line.split(fs)
    enc = DEFAULT_ENCODING
    msh2 = parts[1] if len(parts) > 1 else ""
    if len(msh2) in (4, 5) and len(set(fs + msh2)) == len(msh2) + 1 and not any(c.isalnum() for c in msh2):
        enc = Encoding(fs, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else None)
    elif fs != "|":
        enc = Encoding(fs)

    def field(n: int) -> str:
        v = parts[n - 1] if n - 1 < len(parts) else ""
        return v if all(c.isprintable() for c in v) else ""

    msh9 = field(9)
    trig = msh9.split(enc.component)[1] if enc.component in msh9 else ""
    h = {f"MSH-{n}": field(n) for n in (3, 4, 5, 6, 10, 11, 12, 18)}
    h["trigger"] = trig
    h["MSH-12.1"] = h["MSH-12"].split(enc.component)[0]
    return _build(h, enc, code, error, None)
