"""Structure validation per HL7 version with hl7apy (only for channels that set `validate: true`).

hl7apy is slow (~100 messages/s) but knows every version's structures, so it is used here and
nowhere on the hot path. It is fed the view's normalised text (CR terminators, 4 encoding
characters before v2.7) because it chokes on LF and on a 5th encoding character. Its findings
become ProcessingErrors with an HL7 table 0357 code and, where it names one, an ERR-2 location.
"""

from __future__ import annotations

import os
import re
import tempfile

from engine.errors import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_VERSION_ID,
    ProcessingError,
)
from engine.hl7.er7 import Message

__all__ = ["segment_sequence_errors", "validate_structure"]

_FIELD = re.compile(r"^([A-Z][A-Z0-9]{2})_(\d+)$")
_COMP = re.compile(r"^[A-Z][A-Z0-9]{1,3}_(\d+)$")
_SEG = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_MISSING = re.compile(r"^Missing required child (\S+)\.(\S+)$")
_LIMIT = re.compile(r"^Child limit exceeded (\S+)\.(\S+)$")
_DATATYPE = re.compile(r"^Datatype \S+ is not correct for (\S+)\.(\S+) ")
_INVALID_NAME = re.compile(r"Invalid name for \w+: (\S+)")


def _location(parent: str, child: str) -> str:
    """hl7apy element names -> ERR-2 style location ('PID', 'PID_3' -> 'PID-3'; 'PID_3', 'CX_1' -> 'PID-3.1')."""
    m = _FIELD.match(child)
    if m:
        return f"{m.group(1)}-{int(m.group(2))}"
    pf = _FIELD.match(parent)
    mc = _COMP.match(child)
    if pf and mc:
        return f"{pf.group(1)}-{int(pf.group(2))}.{int(mc.group(1))}"
    if _SEG.match(child):
        return child
    return ""


def _choice_artefact(parent: str) -> bool:
    """hl7apy models choice groups (ORM's OBR|RQD|RQ1|RXO|ODS|ODT) as all-required: not real errors."""
    return "CHOICE" in parent or parent.endswith("_SUPPGRP")


def _convert(text: str) -> ProcessingError | None:
    m = _MISSING.match(text)
    if m:
        parent, child = m.groups()
        if _choice_artefact(parent):
            return None
        loc = _location(parent, child)
        if _FIELD.match(child) or _COMP.match(child):
            return ProcessingError(f"required {loc or child} missing", REQUIRED_FIELD_MISSING, loc)
        return ProcessingError(f"required segment or group {child} missing", SEGMENT_SEQUENCE_ERROR, loc)
    m = _LIMIT.match(text)
    if m:
        parent, child = m.groups()
        loc = _location(parent, child)
        code = DATA_TYPE_ERROR if (_FIELD.match(child) or _COMP.match(child)) else SEGMENT_SEQUENCE_ERROR
        return ProcessingError(f"too many repetitions of {loc or child}", code, loc)
    m = _DATATYPE.match(text)
    if m:
        loc = _location(*m.groups())
        return ProcessingError(f"wrong data type in {loc or m.group(2)}", DATA_TYPE_ERROR, loc)
    if text.startswith(("Invalid children detected", "Unknown element found", "Invalid element found")):
        seg = re.search(r"\b([A-Z][A-Z0-9]{2})\b", text.split(":", 1)[-1])
        return ProcessingError("unexpected segment or element in the message structure", SEGMENT_SEQUENCE_ERROR,
                               seg.group(1) if seg else "")
    return ProcessingError(f"structure error: {text[:120]}", SEGMENT_SEQUENCE_ERROR)


def _hl7apy_text(msg: Message) -> str:
    """CR-terminated text with MSH-2 cut to 4 characters for versions before 2.7."""
    text = msg.to_er7()
    enc = msg.encoding
    if enc.truncation:
        try:
            major_minor = tuple(int(x) for x in msg.version.split(".")[:2])
        except ValueError:
            major_minor = (0, 0)
        if major_minor < (2, 7):
            head = f"MSH{enc.field}{enc.msh2}"
            text = f"MSH{enc.field}{enc.msh2[:4]}" + text[len(head):]
    return text


def _parse_error(e: Exception) -> ProcessingError:
    """An exception from hl7apy's strict parser -> ProcessingError (no values from the message)."""
    from hl7apy import exceptions as hx

    name = type(e).__name__
    if isinstance(e, hx.UnsupportedVersion):
        return ProcessingError("HL7 version not supported for validation", UNSUPPORTED_VERSION_ID, "MSH-12")
    if isinstance(e, hx.OperationNotAllowed | hx.InvalidName) and "unknown Element" in str(e):
        return ProcessingError("message type/structure unknown to the validator", UNSUPPORTED_MESSAGE_TYPE, "MSH-9")
    if isinstance(e, hx.InvalidName):
        m = _INVALID_NAME.search(str(e))
        loc = ""
        if m:
            seg = re.match(r"^([A-Z][A-Z0-9]{2})", m.group(1))
            loc = seg.group(1) if seg and not _COMP.match(m.group(1)) else ""
        return ProcessingError("unknown element in the message", SEGMENT_SEQUENCE_ERROR, loc)
    if isinstance(e, hx.MaxChildLimitReached | hx.ChildNotValid | hx.ChildNotFound):
        return ProcessingError(f"message structure not valid ({name})", SEGMENT_SEQUENCE_ERROR)
    if isinstance(e, hx.InvalidEncodingChars):
        return ProcessingError("invalid encoding characters", DATA_TYPE_ERROR, "MSH-2", ack_code="AR")
    if isinstance(
        e, ValueError | hx.InvalidDataType | hx.InvalidDateFormat | hx.InvalidDateOffset | hx.MaxLengthReached
    ):
        return ProcessingError("a value does not match its data type", DATA_TYPE_ERROR)
    return ProcessingError(f"message could not be validated ({name})", SEGMENT_SEQUENCE_ERROR)


def _card(card: tuple[int, int]) -> str:
    lo, hi = card
    if (lo, hi) == (1, 1):
        return ""
    if hi == -1:
        return "*" if lo == 0 else ("+" if lo == 1 else f"{{{lo},}}")
    return "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"


def _pattern(node: tuple | list) -> str:
    """Regex over 'SEG ' tokens for one hl7apy structure node (segment or group)."""
    name, ref, card, kind = node[0], node[1], node[2], node[3]
    if kind == "SEG":
        return f"(?:{name} ){_card(card)}"
    join = "|" if ref[0] == "choice" else ""
    inner = join.join(_pattern(c) for c in ref[1])
    return f"(?:{inner}){_card(card)}"


def segment_sequence_errors(msg: Message, structure: str, version: str) -> list[ProcessingError]:
    """Segment order and cardinality against the version's message structure (hl7apy only half checks it).

    Z-segments may stand anywhere. The location names the first segment that cannot follow
    the ones before it (when the `regex` module is present for partial matching).
    """
    from hl7apy import load_reference

    ref = load_reference(structure, "Message", version)
    body = "".join(_pattern(c) for c in ref[1])
    names = [s.name for s in msg.segments() if not s.name.startswith("Z")]
    tokens = "".join(f"{n} " for n in names)
    if re.fullmatch(body, tokens):
        return []
    loc = ""
    try:
        import regex

        rx = regex.compile(body)
        for k in range(1, len(names) + 1):
            if not rx.fullmatch("".join(f"{n} " for n in names[:k]), partial=True):
                loc = names[k - 1]
                break
        else:  # every prefix is viable: something required is missing at the end
            loc = names[-1] if names else "MSH"
    except ImportError:  # pragma: no cover - regex is optional
        pass
    where = f" at {loc}" if loc else ""
    return [ProcessingError(f"segments do not follow the {structure} structure of v{version}{where}",
                            SEGMENT_SEQUENCE_ERROR, loc)]


def validate_structure(msg: Message) -> list[ProcessingError]:
    """Every structure problem hl7apy finds for the message's version; [] when it is valid."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException, ValidationError
    from hl7apy.parser import parse_message
    from hl7apy.validation import Validator

    if not msg.message_type or "^" not in msg.message_type:
        return [ProcessingError("MSH-9 must hold message type and trigger event", UNSUPPORTED_MESSAGE_TYPE, "MSH-9")]
    try:
        parsed = parse_message(_hl7apy_text(msg), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    except (HL7apyException, ValueError) as e:
        return [_parse_error(e)]
    except Exception as e:  # noqa: BLE001 - hl7apy raises plain exceptions for unknown structures
        return [ProcessingError(f"message type not supported by the validator ({type(e).__name__})",
                                UNSUPPORTED_MESSAGE_TYPE, "MSH-9")]
    fd, report = tempfile.mkstemp(prefix="hl7val-", suffix=".txt")
    os.close(fd)
    try:
        try:
            Validator.validate(parsed, report_file=report)
        except ValidationError:
            pass
        except (HL7apyException, ValueError) as e:
            return [_parse_error(e)]
        with open(report, encoding="utf-8", errors="replace") as fh:
            lines = [ln[len("Error: "):].strip() for ln in fh if ln.startswith("Error: ")]
    finally:
        os.unlink(report)
    try:
        out = segment_sequence_errors(msg, parsed.name, parsed.version)
    except Exception:  # noqa: BLE001 - no reference structure: rely on hl7apy alone
        out = []
    seen: set[tuple[int, str, str]] = set()
    for line in lines:
        err = _convert(line)
        if err is None or (out and err.code == SEGMENT_SEQUENCE_ERROR):
            continue  # the sequence check above already names the segment problem
        key = (err.code, err.location, err.text)
        if key not in seen:
            seen.add(key)
            out.append(err)
    return out
