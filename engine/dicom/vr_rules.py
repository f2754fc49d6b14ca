"""Per-VR value rules (PS3.5 6.2) and the per-keyword spec they make, for `engine.dicom.vr`.

Each keyword's spec is built once, on first use, from pydicom's data dictionary: its VR, its VM,
a fast test of a whole (possibly multi-valued) string and the repair of one value. The fast test
is a few C-level str methods for the common single value, behind one compiled pattern for the rest;
it may send a valid value down the slow path (the repair then keeps it), never an invalid one past it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_dict
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "BLOCK_VRS", "DS_FORM", "IDENTIFIERS", "INT_RANGES", "IS_FORM", "OPAQUE_VRS", "TESTS", "Spec",
    "fit_padding", "spec_for", "test_for",
]


# Keywords whose value identifies a patient, order, step, study or code: a cut value would name
# another one, so an invalid value is dropped (and refused when required), never cut.
IDENTIFIERS: frozenset[str] = frozenset({
    "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "AccessionNumber", "AdmissionID",
    "RequestedProcedureID", "ScheduledProcedureStepID", "StudyID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "LocalNamespaceEntityID",
    "UniversalEntityID",
})

_CTRL = "\x00-\x1f\x7f-\x9f"  # C0, DEL and C1 controls (ESC has no meaning in decoded text)
_TEXT_LIMITS = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": 0, "UT": 0}  # characters; 0: no limit
BLOCK_VRS = frozenset({"ST", "LT", "UT"})  # free text: backslash and CR LF FF TAB allowed, VM 1
INT_RANGES = {"US": (0, 0xFFFF), "SS": (-0x8000, 0x7FFF), "UL": (0, 0xFFFFFFFF), "SL": (-0x80000000, 0x7FFFFFFF),
              "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1)}
OPAQUE_VRS = frozenset({"AT", "OB", "OD", "OF", "OL", "OV", "OW", "UN", "NONE"})

_LINE_CTRL = re.compile(f"[{_CTRL}]+")
_BLOCK_CTRL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]+")
_CS = re.compile(r"[A-Z0-9 _]{0,16}")
_AE = re.compile(r"[\x20-\x5b\x5d-\x7e]{0,16}")
_UI = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_DA = re.compile(r"([0-9]{4})(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])")
_TM = re.compile(r"(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?)?)?")
_DT = re.compile(
    r"([0-9]{4})(?:(0[1-9]|1[0-2])(?:(0[1-9]|[12][0-9]|3[01])(?:(?:[01][0-9]|2[0-3])"
    r"(?:[0-5][0-9](?:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?)?)?)?)?)?(?:[+-](?:0[0-9]|1[0-4])[0-5][0-9])?"
)
DS_FORM = re.compile(r" *[+-]?(?:[0-9]+|[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
IS_FORM = re.compile(r" *[+-]?[0-9]+ *")
_AS = re.compile(r"[0-9]{3}[DWMY]")
_UR = re.compile(r"[A-Za-z0-9_:/?#\[\]@!$&'()*+,;=%\-.~]* *")

_DROP = None  # what a single-value fix returns for "no valid value"
Fix = Callable[[str, "Spec"], "tuple[str | None, str]"]


@dataclass(frozen=True, slots=True)
class Spec:
    """What the data dictionary says of one keyword, and the functions that check its values."""

    keyword: str
    vr: str
    vm_max: int  # 0: unlimited
    limit: int  # length limit of one value (characters), 0: none
    identifier: bool
    ok: Callable[[str], object]  # truthy: the whole (possibly multi-valued) string is valid as it is
    fix: Fix  # one value -> (repaired value or None to drop, reason; "" when nothing was wrong)

    @property
    def multi(self) -> bool:
        return self.vm_max != 1


# -- single-value repairs ------------------------------------------------------------------------


def _cut(s: str, limit: int) -> str:
    """The first `limit` characters, backing off so that no letter loses its combining marks."""
    i = limit
    while i > 0 and unicodedata.combining(s[i]):
        i -= 1
    return s[:i].rstrip(" ")


def fit_padding(values: list[str], spec: Spec) -> str:
    """Cut the last text value by one character when the padded element would read one too long.

    An element of odd byte length gets a pad space, and pydicom checks the length of the last value
    before it strips it: 16 characters of SH then read as 17. The answer's character set is chosen
    later (ISO_IR 100 or 192), so both encodings' lengths count. Identifiers are left as they are.
    Returns the reason ("" when nothing was cut); `values` is changed in place.
    """
    limit = spec.limit
    if not limit or spec.identifier or spec.vr not in _TEXT_LIMITS or not values or len(values[-1]) != limit:
        return ""
    joined = "\\".join(values)
    if not (len(joined) & 1 or len(joined.encode("utf-8")) & 1):
        return ""
    values[-1] = _cut(values[-1], limit - 1)
    return f"cut to {limit - 1} characters ({spec.vr}; the padded value would read as {limit + 1})"


def _fix_text(s: str, spec: Spec) -> tuple[str | None, str]:
    reasons = []
    block = spec.vr in BLOCK_VRS
    ctrl = _BLOCK_CTRL if block else _LINE_CTRL
    if ctrl.search(s):
        if spec.identifier:
            return _DROP, "control characters"
        s = ctrl.sub(" ", s).strip(" ")
        reasons.append("control characters replaced by spaces")
    if not block and not spec.multi and "\\" in s:
        if spec.identifier:
            return _DROP, "backslash in a single-valued element"
        s = s[: s.index("\\")].rstrip(" ")
        reasons.append("cut at a backslash (single-valued element)")
    if spec.limit and len(s) > spec.limit:
        if spec.identifier:
            return _DROP, f"longer than {spec.limit} characters ({spec.vr})"
        s = _cut(s, spec.limit)
        reasons.append(f"cut to {spec.limit} characters ({spec.vr})")
    return (s or _DROP), "; ".join(reasons)


def _fix_pn(s: str, spec: Spec) -> tuple[str | None, str]:
    reasons = []
    if _LINE_CTRL.search(s):
        s = _LINE_CTRL.sub(" ", s).strip(" ")
        reasons.append("control characters replaced by spaces")
    if not spec.multi and "\\" in s:
        s = s[: s.index("\\")]
        reasons.append("cut at a backslash (single-valued element)")
    groups = s.split("=")
    if len(groups) > 3:
        groups = groups[:3]
        reasons.append("more than 3 component groups, extra groups dropped")
    out = []
    for group in groups:
        parts = group.split("^")
        if len(parts) > 5:
            group = "^".join(parts[:5])
            reasons.append("more than 5 components in a group, extra components dropped")
        if len(group) > 64:
            group = _cut(group, 64).rstrip("^ ")
            reasons.append("component group cut to 64 characters (PN)")
        out.append(group)
    s = "=".join(out).rstrip("=")
    return (s if s.strip("=^ ") else _DROP), "; ".join(reasons)


def _fix_cs(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    if _CS.fullmatch(t):
        return t, ""
    u = t.upper()
    if u.isascii() and _CS.fullmatch(u):
        return u, "upper-cased (CS)"
    return _DROP, "longer than 16 characters (CS)" if len(t) > 16 else "not upper case letters, digits, space, _ (CS)"


def _fix_ae(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    if t and _AE.fullmatch(t):
        return t, ""
    if not t:
        return _DROP, "only spaces (AE)"
    return _DROP, "longer than 16 characters (AE)" if len(t) > 16 else "backslash or control characters (AE)"


def _fix_ui(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" \x00")
    if len(t) > 64:
        return _DROP, "longer than 64 characters (UI)"
    if _UI.fullmatch(t):
        return t, ""
    return _DROP, "not digits and dots without leading zeros (UI)"


def _real_date(y: str, m: str | None, d: str | None) -> bool:
    if not d:
        return int(y) > 0
    try:
        date(int(y), int(m or 1), int(d))
    except ValueError:
        return False
    return True


def _fix_da(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    m = _DA.fullmatch(t)
    if m and _real_date(*m.groups()):
        return t, ""
    return _DROP, "not a date YYYYMMDD (DA)"


def _fix_tm(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    return (t, "") if _TM.fullmatch(t) else (_DROP, "not a time HH[MM[SS[.F{1,6}]]] (TM)")


def _fix_dt(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    m = _DT.fullmatch(t)
    if m and _real_date(*m.groups()):
        return t, ""
    return _DROP, "not a date-time YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX] (DT)"


def _fix_ds(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    if not DS_FORM.fullmatch(t):
        return _DROP, "not a decimal number (DS)"
    if len(t) <= 16:
        return t, ""
    try:
        return format_number_as_ds(float(t)), "rounded to 16 characters (DS)"
    except (ValueError, OverflowError):
        return _DROP, "not representable in 16 characters (DS)"


def _is_valid(s: str) -> bool:
    t = s.strip(" ")
    return IS_FORM.fullmatch(t) is not None and len(t) <= 12 and -(2**31) <= int(t) < 2**31


def _fix_is(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    return (t, "") if _is_valid(t) else (_DROP, "not an integer string in range (IS)")


def _fix_as(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    return (t, "") if _AS.fullmatch(t) else (_DROP, "not an age nnnD/W/M/Y (AS)")


def _fix_ur(s: str, spec: Spec) -> tuple[str | None, str]:
    t = s.strip(" ")
    return (t, "") if _UR.fullmatch(t) else (_DROP, "not a URI (UR)")


# -- per-keyword specs (built once per keyword) ---------------------------------------------------


def _vm_max(vm: str) -> int:
    top = vm.split("-")[-1]
    return int(top) if top.isdigit() else 0


Test = Callable[[str], object]


def _fast(one: str, vm_max: int, quick: Callable[[Test], Test] | None = None) -> Test:
    """The fast test of a whole element string: one compiled pattern for all its values, behind a
    `quick` test of the common single value (a few C-level str methods, ~3x faster than a regex).

    It may say no to a valid value (days past the 28th, text at its limit): the slow path then
    keeps the value as it is. It never says yes to an invalid one.
    """
    one = f"(?:{one})"
    if vm_max == 1:
        whole = one
    elif vm_max == 0:
        whole = rf"{one}(?:\\{one})*"
    else:
        whole = rf"{one}(?:\\{one}){{0,{vm_max - 1}}}"
    full = re.compile(whole).fullmatch
    return full if quick is None else quick(full)


# quick tests, each `quick(full)` -> test; each says no to a backslash and then asks the pattern


def _quick_text(limit: int) -> Callable[[Test], Test]:
    def make(full: Test) -> Test:
        if not limit:
            return lambda s: ("\\" not in s and s.isprintable()) or full(s)
        return lambda s: (len(s) <= limit and "\\" not in s and s.isprintable()) or full(s)

    return make


def _quick_pn(full: Test) -> Test:
    return lambda s: (len(s) <= 64 and "\\" not in s and "=" not in s and s.count("^") <= 4
                      and s.isprintable()) or full(s)


_CS_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _"


def _quick_cs(full: Test) -> Test:
    return lambda s: (len(s) <= 16 and not s.strip(_CS_CHARS)) or full(s)


def _quick_ae(full: Test) -> Test:
    return lambda s: (len(s) <= 16 and s.isascii() and s.isprintable() and "\\" not in s
                      and not s.isspace()) or full(s)


def _quick_ui(full: Test) -> Test:
    return lambda s: (len(s) <= 64 and s.isascii() and s.replace(".", "").isdigit() and s[0] not in ".0"
                      and s[-1] != "." and ".." not in s and ".0" not in s) or full(s)


def _quick_da(full: Test) -> Test:
    return lambda s: (len(s) == 8 and s.isascii() and s.isdigit() and "01" <= s[4:6] <= "12"
                      and "01" <= s[6:] <= "28" and s[:4] != "0000") or full(s)


def _quick_tm(full: Test) -> Test:
    return lambda s: (len(s) == 6 and s.isascii() and s.isdigit() and s[:2] <= "23" and s[2:4] <= "59"
                      and s[4:] <= "60") or full(s)


def _quick_is(full: Test) -> Test:
    return lambda s: (len(s) <= 9 and s.isascii() and s.isdigit()) or full(s)


_QUICK: dict[str, Callable[[Test], Test]] = {
    "PN": _quick_pn, "CS": _quick_cs, "AE": _quick_ae, "UI": _quick_ui, "DA": _quick_da, "TM": _quick_tm,
    "IS": _quick_is,
}


def _empty(s: str) -> bool:
    """SQ and binary numbers: only "" passes as a string (the slow path converts the rest)."""
    return not s


def _always(s: str) -> bool:
    return True


def _keep(s: str, spec: Spec) -> tuple[str | None, str]:
    return s, ""


def _sized(limit: int, pattern: str) -> str:
    """`pattern`, for values of 1..`limit` characters up to the next backslash."""
    return rf"(?=[^\\]{{1,{limit}}}(?![^\\])){pattern}"


_LINE_CHARS = rf"[^{_CTRL}\\]"
_BLOCK_CHARS = "[^\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]"
_PN_PART = rf"[^{_CTRL}\\=^]*"
_PN_GROUP = rf"(?=[^=\\]{{0,64}}(?![^=\\])){_PN_PART}(?:\^{_PN_PART}){{0,4}}"
_DAY28 = "(?:0[1-9]|1[0-9]|2[0-8])"  # the fast path leaves the 29th-31st to the calendar
_CLOCK = r"(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?)?)?"
_FAST: dict[str, str] = {
    "PN": rf"{_PN_GROUP}(?:={_PN_GROUP}){{0,2}}",
    "CS": "[A-Z0-9 _]{0,16}",
    "AE": r"(?=[^\\]*[^ \\])[\x20-\x5b\x5d-\x7e]{1,16}",
    "UI": _sized(64, r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*"),
    "DA": f"(?!0000)[0-9]{{4}}(?:0[1-9]|1[0-2]){_DAY28}",
    "DT": rf"(?!0000)[0-9]{{4}}(?:(?:0[1-9]|1[0-2])(?:{_DAY28}(?:{_CLOCK})?)?)?(?:[+-](?:0[0-9]|1[0-4])[0-5][0-9])?",
    "TM": _CLOCK,
    "DS": _sized(16, DS_FORM.pattern),
    "IS": r" *[+-]?[0-9]{1,9} *",
    "AS": _AS.pattern,
    "UR": _UR.pattern,
}
_FIX: dict[str, Fix] = {
    "PN": _fix_pn, "CS": _fix_cs, "AE": _fix_ae, "UI": _fix_ui, "DA": _fix_da, "DT": _fix_dt, "TM": _fix_tm,
    "DS": _fix_ds, "IS": _fix_is, "AS": _fix_as, "UR": _fix_ur,
}
_SPECS: dict[str, Spec] = {}
TESTS: dict[str, Callable[[str], object]] = {}  # keyword -> its spec's `ok`, for the hot path


def spec_for(keyword: str) -> Spec | None:
    """The spec of a DICOM keyword (None for a key that is not one), built on first use.

    Only DICOM keywords are kept, so the caches stay bounded whatever keys an item brings.
    """
    spec = _SPECS.get(keyword)
    if spec is None:
        spec = _build_spec(keyword)
        if spec is not None:
            _SPECS[keyword] = spec
            TESTS[keyword] = spec.ok
    return spec


def test_for(keyword: str) -> Callable[[str], object]:
    """The fast test of a keyword's string values (a non-keyword's are not checked)."""
    spec = spec_for(keyword)
    return _always if spec is None else spec.ok


def _build_spec(keyword: str) -> Spec | None:
    tag = keyword_dict.get(keyword)
    if tag is None:
        return None
    vr = dictionary_VR(tag).split(" or ")[0]  # "US or SS" kinds: the first, as dicom_out does
    vm_max = _vm_max(dictionary_VM(tag))
    ident = keyword in IDENTIFIERS
    if vr in _TEXT_LIMITS:
        limit = _TEXT_LIMITS[vr]
        if vr in BLOCK_VRS:
            vm_max = 1
        chars = _BLOCK_CHARS if vr in BLOCK_VRS else _LINE_CHARS
        # text at its limit goes the slow way (see fit_padding), unless it is an identifier (never cut)
        fast_limit = limit if ident or not limit else limit - 1
        fast = f"{chars}{{0,{fast_limit}}}" if limit else f"{chars}*"
        quick = None if vr in BLOCK_VRS else _quick_text(fast_limit)
        return Spec(keyword, vr, vm_max, limit, ident, _fast(fast, vm_max, quick), _fix_text)
    if vr in _FAST:
        limit = {"PN": 64, "CS": 16, "AE": 16, "UI": 64, "DS": 16, "IS": 12}.get(vr, 0)
        return Spec(keyword, vr, vm_max, limit, ident, _fast(_FAST[vr], vm_max, _QUICK.get(vr)), _FIX[vr])
    # binary numbers must not stay strings (the slow path converts them); opaque VRs pass
    stringless = vr == "SQ" or vr in INT_RANGES or vr in ("FL", "FD")
    return Spec(keyword, vr, vm_max, 0, ident, _empty if stringless else _always, _keep)


