"""HL7 path expressions as mappings write them, checked and compiled once at load time."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_PATH = re.compile(
    r"^(?P<root>/)?(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segrep>[1-9][0-9]*|\*)\])?"
    r"-(?P<field>[1-9][0-9]*)(?:\[(?P<rep>[1-9][0-9]*|\*)\])?"
    r"(?:\.(?P<comp>[1-9][0-9]*)(?:\.(?P<sub>[1-9][0-9]*))?)?$"
)


def check_path(text: Any) -> None:
    """Raise ValueError with an analyst-readable reason when `text` is not an HL7 path."""
    if not isinstance(text, str):
        raise ValueError("an HL7 path is text like PID-3.1")
    if _PATH.match(text) is None:
        raise ValueError(
            "not an HL7 path (SEG-FIELD[.COMPONENT[.SUB]], e.g. PID-3.1, OBX[2]-5, PID-3[*].1; numbers start at 1)"
        )


def is_list(text: str) -> bool:
    """A path with [*] gives every repetition, so its value is always a list."""
    return "[*]" in text


def has_component(text: str) -> bool:
    """PID-5.1 (a component) rather than PID-5 (a field)."""
    m = _PATH.match(text)
    return m is not None and m["comp"] is not None


def segment_of(text: str) -> str:
    """PID-3.1 -> PID; /ZDS-1 (the message's ZDS, even inside a for_each group) -> ZDS."""
    return text[1:4] if text[:1] == "/" else text[:3]


@lru_cache(maxsize=4096)
def compile_path(text: str) -> Any:
    """Check then compile with the ER7 view's compiler (cached: one Path object per text)."""
    check_path(text)
    from engine.hl7.er7 import compile_path as er7_compile

    try:
        return er7_compile(text)
    except ValueError:
        raise
    except Exception as exc:  # the view's own complaint, whatever its type
        raise ValueError(str(exc)) from exc


def repetition_path(text: str, index: int) -> str:
    """`PID-3[*].1` -> `PID-3[2].1`: the path of one repetition of a `[*]` path (one `[*]` only)."""
    m = _PATH.match(text)
    if m is None or text.count("[*]") != 1:
        raise ValueError("only a path with exactly one [*] has numbered repetitions")
    out = (m["root"] or "") + m["seg"]
    out += f"[{index}]" if m["segrep"] == "*" else (f"[{m['segrep']}]" if m["segrep"] else "")
    out += f"-{m['field']}" + (f"[{index}]" if m["rep"] == "*" else (f"[{m['rep']}]" if m["rep"] else ""))
    if m["comp"]:
        out += f".{m['comp']}" + (f".{m['sub']}" if m["sub"] else "")
    return out
