"""DICOM value rules (PS3.5 6.2) applied to a mapped worklist item before it is stored.

A worklist item is the contract dict of `engine.dicom.dataset`: DICOM keyword -> DICOM-formatted
string ("" for a zero-length value, backslash between the values of a multi-valued element, or a
list of values), and a sequence as a list of such dicts. Each value is checked against the VR and
VM its keyword has in pydicom's data dictionary; a value that breaks them is repaired or dropped
with a `ProcessingWarning` (code 102), so that the SCP never answers with a value a modality could
choke on. What is repaired, what is dropped:

- text (SH, LO, ST, LT, UC, UT, PN): control characters become a space (LT/ST/UT keep CR, LF, FF,
  TAB); a backslash in a single-valued field cuts the value there (it would read as a second
  value); too long is cut at the limit, counted in characters as PS3.5 6.2 says, never between a
  letter and its combining accent, and one shorter when the padded element would read as one too
  long (pydicom checks before it strips the pad). PN: each of the (at most 3) component groups is
  cut to 64 characters, at most 5 components each.
- codes and identifiers are never cut, since a cut one names something else: CS, AE, UI, DA, TM,
  DT, AS, IS, UR and the keywords in `IDENTIFIERS` are dropped when invalid. CS in lower case is
  upper-cased (with a warning); padding spaces (and NUL after a UID) are removed silently.
- DA is a real date (YYYYMMDD), TM is HH, HHMM, HHMMSS or HHMMSS.F{1,6}, DT is YYYY[MM[DD[HH[MM
  [SS[.F{1,6}]]]]]] with an optional &ZZXX offset; ranges (query syntax) are not stored values.

A dropped value becomes "" (zero length). A keyword named in `required` (an index-free path such
as "ScheduledProcedureStepSequence.Modality") with no valid value left raises `ProcessingError`
(101 when it was missing or empty, 102 when it was dropped here). Keys that are not DICOM keywords
are passed on untouched. Warnings name the element, never its value (PHI). The rules per VR live
in `engine.dicom.vr_rules`; this module walks the item.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Any

from engine.dicom.vr_rules import (
    BLOCK_VRS,
    DS_FORM,
    IDENTIFIERS,
    INT_RANGES,
    IS_FORM,
    OPAQUE_VRS,
    TESTS,
    Spec,
    fit_padding,
    spec_for,
    test_for,
)
from engine.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, ProcessingError, ProcessingWarning

__all__ = ["IDENTIFIERS", "check_item"]


# -- the walk over an item ------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _required_tree(required: tuple[str, ...] | frozenset[str]) -> dict[str, frozenset[str]]:
    """Index-free parent path with its dot -> required keywords under it ("" is the top level)."""
    tree: dict[str, set[str]] = {}
    for path in required:
        parent, dot, keyword = path.rpartition(".")
        tree.setdefault(parent + dot, set()).add(keyword)
    return {k: frozenset(v) for k, v in tree.items()}


_EMPTY, _MISSING = "required value is empty", "required value is missing"


class _Walk:
    """One call's context: where warnings go, which paths are required, known HL7 locations."""

    __slots__ = ("locations", "required", "source", "warnings")

    def __init__(self, warnings: list[ProcessingWarning], required: dict[str, frozenset[str]],
                 locations: Mapping[str, str], source: str) -> None:
        self.warnings = warnings
        self.required = required
        self.locations = locations
        self.source = source

    def location(self, path: str, plain: str) -> str:
        if not self.locations:
            return ""
        return self.locations.get(path) or self.locations.get(plain) or ""

    def warn(self, path: str, plain: str, text: str) -> None:
        self.warnings.append(ProcessingWarning(
            text=f"{path}: {text}", code=DATA_TYPE_ERROR, location=self.location(path, plain),
            source=self.source, target=path))

    def refuse(self, prefix: str, plain_prefix: str, keyword: str, code: int, text: str) -> ProcessingError:
        path = prefix + keyword
        return ProcessingError(f"{path}: {text}", code, self.location(path, plain_prefix + keyword), ack_code="AE",
                               source=self.source)

    def item(self, item: dict[str, Any], prefix: str, plain_prefix: str) -> dict[str, Any]:
        """One item (the top level or a sequence item); paths are built only for a warning."""
        out: dict[str, Any] | None = None
        required = self.required.get(plain_prefix) if self.required else None
        tests = TESTS
        for keyword, value in item.items():
            if type(value) is str:
                if value:
                    test = tests.get(keyword) or test_for(keyword)
                    if test(value):
                        continue  # the hot path: a valid string (never for SQ; always for a non-keyword)
                else:
                    if required and keyword in required:
                        raise self.refuse(prefix, plain_prefix, keyword, REQUIRED_FIELD_MISSING, _EMPTY)
                    continue
            elif value is None:
                if required and keyword in required:
                    raise self.refuse(prefix, plain_prefix, keyword, REQUIRED_FIELD_MISSING, _EMPTY)
                continue
            spec = spec_for(keyword)
            if spec is None:
                continue
            path, plain = prefix + keyword, plain_prefix + keyword
            new = self.sequence(value, path, plain) if spec.vr == "SQ" else self.value(value, spec, path, plain)
            if new is not value:
                if out is None:
                    out = dict(item)
                out[keyword] = new
            if required and keyword in required and (new is None or new == "" or new == []):
                if value == []:
                    raise self.refuse(prefix, plain_prefix, keyword, REQUIRED_FIELD_MISSING, _EMPTY)
                raise self.refuse(prefix, plain_prefix, keyword, DATA_TYPE_ERROR, f"required value not valid {spec.vr}")
        if required:
            for keyword in required:
                if keyword not in item:
                    raise self.refuse(prefix, plain_prefix, keyword, REQUIRED_FIELD_MISSING, _MISSING)
        return item if out is None else out

    def sequence(self, value: Any, path: str, plain: str) -> Any:
        if value is None or value == "":
            return value
        if isinstance(value, dict):
            items: list[Any] = [value]
        elif isinstance(value, list):
            items = value
        else:
            self.warn(path, plain, "not a sequence of items, dropped")
            return []
        out = []
        changed = items is not value
        for i, entry in enumerate(items):
            if not isinstance(entry, dict):
                self.warn(f"{path}[{i}]", plain, "not a sequence item, dropped")
                changed = True
                continue
            checked = self.item(entry, f"{path}[{i}].", f"{plain}.")
            changed = changed or checked is not entry
            out.append(checked)
        return out if changed else value

    def value(self, value: Any, spec: Spec, path: str, plain: str) -> Any:
        """A value that failed the fast test (or is not a str): repaired, cut or dropped ("")."""
        if spec.vr in INT_RANGES or spec.vr in ("FL", "FD"):
            return self.binary(value, spec, path, plain)
        if spec.vr in OPAQUE_VRS:
            return value
        if isinstance(value, dict):
            self.warn(path, plain, "a mapping where a value belongs, dropped")
            return ""
        as_list = isinstance(value, list)
        values = [_text(v) for v in value] if as_list else None
        if values is None:
            text = _text(value)
            values = text.split("\\") if spec.multi and spec.vr not in BLOCK_VRS else [text]
        reasons: list[str] = []
        if spec.vm_max == 1 and len(values) > 1:
            if spec.identifier:
                self.warn(path, plain, "more than one value in a single-valued element, dropped")
                return ""
            values = values[:1]
            reasons.append("only the first of several values kept (single-valued element)")
        kept: list[str] = []
        for v in values:
            if v == "":
                kept.append(v)
                continue
            fixed, why = spec.fix(v, spec)
            if why:
                reasons.append(why if fixed is not None else f"{why}, dropped")
            if fixed is not None:
                kept.append(fixed)
        if spec.vm_max and len(kept) > spec.vm_max:
            kept = kept[: spec.vm_max]
            reasons.append(f"more than {spec.vm_max} values, extra values dropped")
        padding = fit_padding(kept, spec)
        if padding:
            reasons.append(padding)
        if reasons:
            self.warn(path, plain, "; ".join(dict.fromkeys(reasons)))
        if not any(kept):
            return ""
        if as_list:
            return value if not reasons and kept == value else kept
        joined = "\\".join(kept)
        return value if not reasons and joined == value else joined

    def binary(self, value: Any, spec: Spec, path: str, plain: str) -> Any:
        """US/SS/UL/SL/UV/SV: an int in range; FL/FD: a number. Number strings become numbers."""
        if not isinstance(value, bool):
            if spec.vr in ("FL", "FD"):
                if isinstance(value, (int, float)):
                    return value
                if isinstance(value, str) and DS_FORM.fullmatch(value):
                    return float(value)
            else:
                low, high = INT_RANGES[spec.vr]
                number = value if isinstance(value, int) else None
                if isinstance(value, str) and IS_FORM.fullmatch(value):
                    number = int(value)
                if number is not None and low <= number <= high:
                    return number
        self.warn(path, plain, f"not a number for {spec.vr}, dropped")
        return ""


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def check_item(
    item: dict[str, Any],
    *,
    required: Collection[str] = (),
    warnings: list[ProcessingWarning],
    locations: Mapping[str, str] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The item with every value valid for its VR; the input is returned as is when nothing changed.

    `required`: index-free keyword paths ("PatientID", "ScheduledProcedureStepSequence.Modality")
    that must keep a valid value, else ProcessingError (AE 101/102). `locations`: keyword path
    (with or without indices) -> HL7 location for the warnings and errors (e.g. "ORC-18.1");
    `source` names the mapping. Warnings are appended to `warnings`, one per element changed.
    """
    tree = _required_tree(required if isinstance(required, (tuple, frozenset)) else tuple(required)) if required else {}
    return _Walk(warnings, tree, locations or {}, source).item(item, "", "")
