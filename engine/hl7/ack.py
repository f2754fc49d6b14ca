"""HL7 acknowledgements (original AA/AE/AR and enhanced CA/CE/CR) built as plain strings.

One place turns a ProcessingError into MSA + ERR so that every layer only has to raise.
Building is string concatenation (no hl7apy) because an ACK goes out for every message.

Every sender must get an answer, so the public builders never raise: a header that cannot be
echoed (MSH-2 holding the field separator, alphanumeric delimiters, a charset that is not one)
falls back to `|^~\\&` and a plain header, and a bug falls back to `minimal_ack`.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import os
import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from engine.errors import APPLICATION_INTERNAL_ERROR, TABLE_VALUE_NOT_FOUND, ProcessingError, ProcessingWarning
from engine.hl7.charsets import ascii_compatible, hl7_name, python_codec
from engine.hl7.er7 import DEFAULT_ENCODING, Encoding, Message, compile_path
from engine.hl7.escape import escape

__all__ = [
    "AckMode",
    "ack_codec",
    "ack_mode",
    "build_ack",
    "build_ack_from_raw",
    "busy_ack",
    "check_charset",
    "erl",
    "fallback_ack",
    "minimal_ack",
    "new_control_id",
    "should_send",
]

log = logging.getLogger(__name__)

ENGINE_BUSY = "engine busy"

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
    segs = [fs.join(_clean(x) for x in msh), fs.join(_clean(x) for x in msa)]
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


def _same_codec(a: str, b: str) -> bool:
    try:
        return codecs.lookup(a).name == codecs.lookup(b).name
    except LookupError:
        return False


def ack_codec(msg: Message) -> str:
    """The Python codec an ACK to `msg` is written in: the one its bytes were actually decoded with.

    Pure-ASCII bytes are decoded without consulting MSH-18 (ASCII reads the same in every
    ASCII-compatible charset). Their ACK goes out in the declared charset only when that charset
    writes ASCII as ASCII (8859/x, UTF-8, Shift-JIS ...); when it does not (MSH-18 says UTF-16 or
    UTF-32 but the bytes were plain ASCII) the sender evidently writes and reads ASCII, so the ACK
    is ASCII too, and its MSH-18 says so. A wide-charset ACK there would be unreadable to it.
    """
    used = msg._codec  # None: the bytes were pure ASCII and MSH-18 was not consulted
    if used is not None and used != "ascii":
        return used if python_codec(used) else "ascii"
    declared = python_codec(msg.charset)
    return declared if declared and ascii_compatible(declared) else "ascii"


def check_charset(msg: Message, override: str | None = None) -> None:
    """Refuse a message whose MSH-18 names no text encoding (`base64`, `rot13` ...).

    Non-ASCII bytes are checked by the parser when it decodes them; pure-ASCII bytes are parsed
    without reading MSH-18, so this check makes both kinds get the same AE at MSH-18. A channel
    `charset` override wins over MSH-18 and skips the check.
    """
    if override:
        return
    declared = msg.charset
    if declared.strip() and python_codec(declared) is None:
        raise ProcessingError(
            f"unknown character set {declared[:40]!r} (not an HL7 table 0211 text encoding)",
            TABLE_VALUE_NOT_FOUND,
            "MSH-18",
        )


def _stated_charset(declared: str, codec: str) -> str:
    """MSH-18 of the ACK: the sender's own name when it is the codec used, else the HL7 name of that codec."""
    if not declared.strip():
        return ""
    hit = python_codec(declared)
    if hit is not None and _same_codec(hit, codec):
        return declared
    return hl7_name(codec)


def build_ack(
    msg: Message,
    code: str,
    error: ProcessingError | None = None,
    *,
    control_id: str | None = None,
    warnings: Sequence[ProcessingWarning] = (),
) -> str:
    """ACK for msg: sender/receiver swapped, same version, MSA-2 = its MSH-10, ERR from `error`.

    Write it in `ack_codec(msg)`; its MSH-18 names that charset. Raises only for an unknown `code`
    (a bug of the caller), never for what the message holds.
    """
    _check_code(code)
    try:
        enc = msg.encoding
        f = msg._first_fields("MSH") or []

        def raw(n: int) -> str:
            return f[n] if n < len(f) else ""

        h = {k: raw(n) for k, n in (("MSH-3", 3), ("MSH-4", 4), ("MSH-5", 5), ("MSH-6", 6), ("MSH-10", 10),
                                    ("MSH-11", 11), ("MSH-12", 12))}
        h["MSH-18"] = _stated_charset(msg.charset, ack_codec(msg))
        h["trigger"] = escape(msg.trigger, enc)
        h["MSH-12.1"] = msg.version
        return _build(h, enc, code, error, control_id, warnings)
    except Exception as exc:  # an answer must go out whatever the header holds
        log.error("building an ACK failed (%s); answering a minimal one", type(exc).__name__)
        return minimal_ack(code, error)


def _check_code(code: str) -> None:
    if code.upper() not in ACK_CODES:
        raise ValueError(f"unknown acknowledgement code {code!r}")


def _safe_encoding(fs: str, msh2: str) -> Encoding | None:
    """The sender's delimiters when an ACK can be written with them; None when they would break it."""
    chars = fs + msh2
    if len(msh2) not in (4, 5) or len(set(chars)) != len(chars):
        return None
    if any(c.isalnum() or c.isspace() or not c.isprintable() for c in chars):
        return None
    return Encoding(fs, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else None)


def _split_msh(line: str) -> tuple[str, list[str]]:
    """MSH-1 and the fields of an MSH line as the sender meant them, even when MSH-2 holds MSH-1.

    `parts[n - 1]` is MSH-n. MSH-2 is 4 (or 5) characters by definition, so when a naive split
    would give a shorter one and the separator follows 4 (or 5) characters, those are MSH-2:
    `MSH|^~|&|APP|...` then still has MSH-3 = APP and MSA-2 the sender's MSH-10.
    """
    fs = line[3]
    first = line.find(fs, 4)
    size = (first if first >= 0 else len(line)) - 4
    if size not in (4, 5):
        if line[8:9] == fs:
            size = 4
        elif line[9:10] == fs:
            size = 5
    msh2 = line[4 : 4 + size]
    rest = line[4 + size + 1 :]
    return fs, ["MSH", msh2, *(rest.split(fs) if 4 + size < len(line) else [])]


def build_ack_from_raw(raw: bytes, code: str, error: ProcessingError | None) -> str | None:
    """Best-effort ACK when Message.parse failed: MSH read naively, `|^~\\&` when its delimiters break an ACK.

    Write it in latin-1: echoed fields then go back byte for byte as they came. None when the
    bytes hold no MSH line; raises only for an unknown `code`.
    """
    _check_code(code)
    try:
        return _from_raw(raw, code, error)
    except Exception as exc:  # an answer must go out whatever the bytes hold
        log.error("building an ACK from raw bytes failed (%s); answering a minimal one", type(exc).__name__)
        return minimal_ack(code, error)


def _from_raw(raw: bytes, code: str, error: ProcessingError | None) -> str | None:
    text = raw[:65536].decode("latin-1").lstrip("\ufeff\x0b \t\r\n")
    if text.startswith("\xef\xbb\xbf"):
        text = text[3:]
    if not text.startswith("MSH") or len(text) < 4:
        return None
    line = re.split(r"[\r\n]", text, maxsplit=1)[0]
    if len(line) < 4:
        return None
    fs, parts = _split_msh(line)  # read as the sender meant it, even with a letter for MSH-1
    msh2 = parts[1] if len(parts) > 1 else ""
    enc = _safe_encoding(fs, msh2) or DEFAULT_ENCODING
    sender_cs = msh2[0] if msh2 and msh2[0] != fs else "^"
    sender_rs = msh2[1] if len(msh2) > 1 and msh2[1] != fs else "~"
    fs_escape = f"{enc.escape}F{enc.escape}"

    def field(n: int) -> str:
        v = parts[n - 1] if n - 1 < len(parts) else ""
        if not all(c.isprintable() for c in v):
            return ""
        # only when the sender's separator was not '|': a '|' in its data would shift the ACK's fields
        return v[:200].replace(enc.field, fs_escape)

    msh9 = parts[8] if len(parts) > 8 else ""
    comps = msh9.split(sender_cs)
    trig = comps[1] if len(comps) > 1 and comps[1].isalnum() else ""
    h = {f"MSH-{n}": field(n) for n in (3, 4, 5, 6, 10, 11, 12)}
    declared = field(18).split(sender_rs)[0]
    hit = python_codec(declared) if declared else None
    h["MSH-18"] = declared if hit is not None and ascii_compatible(hit) else ""
    h["trigger"] = trig
    h["MSH-12.1"] = h["MSH-12"].split(sender_cs)[0]
    return _build(h, enc, code, error, None)


def _plain(value: str, limit: int) -> str:
    """A value safe in any `|^~\\&` field: printable ASCII without delimiters, cut to `limit`."""
    return "".join(c for c in value[:limit] if " " <= c <= "~" and c not in "|^~\\&")


def minimal_ack(code: str = "AR", error: ProcessingError | None = None, control_id: str = "") -> str:
    """The last-resort answer: a fixed header, MSA-2 when known, ERR code only. Cannot raise."""
    try:
        code = code.upper() if code.upper() in ACK_CODES else "AR"
        ecode = error.code if error is not None and isinstance(error.code, int) else APPLICATION_INTERNAL_ERROR
        text = _plain(error.text, 80) if error is not None else ""
        stamp = _now()
        ack_id = new_control_id()
    except Exception:  # pragma: no cover - nothing above should fail; the constant below cannot
        return "MSH|^~\\&|||||||ACK^^ACK|0|P|2.5\rMSA|AR\r"
    err = f"ERR|||{ecode}^{_plain(TABLE_0357.get(ecode, 'Application error'), 60)}^HL70357|E||||{text}\r"
    return f"MSH|^~\\&||||||{stamp}||ACK^^ACK|{ack_id}|P|2.5\rMSA|{code}|{_plain(control_id, 200)}\r{err}"


def busy_ack(head: bytes) -> bytes:
    """AR with ERR 207 "engine busy" for a frame refused because the buffer budget was spent.

    `head` is the start of the refused frame (enough for its MSH); latin-1 as build_ack_from_raw.
    """
    err = ProcessingError(ENGINE_BUSY, APPLICATION_INTERNAL_ERROR, ack_code="AR")
    return (build_ack_from_raw(head, "AR", err) or minimal_ack("AR", err)).encode("latin-1", errors="replace")


def fallback_ack(raw: bytes) -> bytes:
    """AR for a frame whose regular answer could not be built (a bug): keeps the sender talking."""
    err = ProcessingError("internal error while answering", APPLICATION_INTERNAL_ERROR, ack_code="AR")
    return (build_ack_from_raw(raw, "AR", err) or minimal_ack("AR", err)).encode("latin-1", errors="replace")
