"""Formats for `output: fhir` mappings: HL7 names and codes as FHIR elements.

Registered in the shared FORMATS registry (imported at the end of `engine.mapping.formats`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.mapping.formats import FORMATS

if TYPE_CHECKING:
    from engine.mapping.context import RuleContext


def _c(parts: Any, i: int) -> str:
    return str(parts[i]).strip() if i < len(parts) else ""


@FORMATS.register("xpn_to_human_name", components=True)
def xpn_to_human_name(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 XPN (family^given^middle^suffix^prefix) -> FHIR HumanName."""
    if not value:
        return None
    name: dict[str, Any] = {}
    family = _c(value, 0).split("&")[0]  # FN: surname&own surname prefix...
    if family:
        name["family"] = family
    given = [g for g in (_c(value, 1), _c(value, 2)) if g]
    if given:
        name["given"] = given
    if _c(value, 4):
        name["prefix"] = [_c(value, 4)]
    if _c(value, 3):
        name["suffix"] = [_c(value, 3)]
    return name or None


@FORMATS.register("xcn_to_display", components=True)
def xcn_to_display(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 XCN / CNN (id^family^given^middle^suffix^prefix) -> "prefix given middle family" for a
    Reference.display."""
    if not value:
        return ""
    words = [_c(value, 5), _c(value, 2), _c(value, 3), _c(value, 1), _c(value, 4)]
    return " ".join(w for w in words if w)


_GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "N": "other", "U": "unknown"}


@FORMATS.register("sex_to_fhir")
def sex_to_fhir(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 table 0001 (PID-8) -> FHIR administrative gender; an unknown code is left out."""
    if not isinstance(value, str) or not value:
        return ""
    return _GENDER.get(value.strip().upper(), "")
