"""Named value converters (`format:` in a mapping rule).

A new format is one function registered with `@FORMATS.register("name")`: the compiler looks
names up here at load time, so a typo is a config error, not a message failure. A format gets the
value and the rule it belongs to (settings, location, options); it returns the converted value.
A value it cannot convert is `rule.invalid(code, text)`: the rule's `on_invalid` drops it with a
warning or refuses the message, after a `from:` chain tried its next field. `rule.fail(...)`
refuses whatever the rule says (nothing to derive a value from), and `rule.warn(...)` keeps a
value that was read although it was not sent as HL7 says.

`components=True` formats receive the decoded components of the addressed field (a `Parts`
tuple; `.sub(i)` gives the decoded subcomponents of component i) instead of its text, so escape
sequences inside a name never split it wrongly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from engine.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND

if TYPE_CHECKING:
    from engine.mapping.context import RuleContext

FormatFunc = Callable[[Any, "RuleContext", Any], Any]  # (value, rule, scope) -> converted


@dataclass(frozen=True)
class Format:
    name: str
    func: FormatFunc
    components: bool = False  # wants decoded components, not text
    options: frozenset[str] = frozenset()  # extra rule keys this format reads (HL7 paths)
    needs_settings: tuple[str, ...] = ()  # settings that must be present when this format is used
    doc: str = ""
    whole: bool = False  # takes a list (from a [*] path) as one value instead of item by item


@dataclass
class FormatRegistry:
    """Formats by name; an object so tests and plug-ins can build their own."""

    formats: dict[str, Format] = field(default_factory=dict)

    def register(
        self,
        name: str,
        *,
        components: bool = False,
        options: Iterable[str] = (),
        needs_settings: Iterable[str] = (),
        whole: bool = False,
    ) -> Callable[[FormatFunc], FormatFunc]:
        def deco(func: FormatFunc) -> FormatFunc:
            doc = (func.__doc__ or "").strip()
            self.formats[name] = Format(name, func, components, frozenset(options), tuple(needs_settings), doc, whole)
            return func

        return deco

    def get(self, name: str) -> Format | None:
        return self.formats.get(name)

    def names(self) -> list[str]:
        return sorted(self.formats)


FORMATS = FormatRegistry()


# ---------------------------------------------------------------- text


@FORMATS.register("upper")
def _upper(value: Any, rule: RuleContext, scope: Any) -> Any:
    """Upper-case the text."""
    return value.upper() if isinstance(value, str) else value


@FORMATS.register("trim")
def _trim(value: Any, rule: RuleContext, scope: Any) -> Any:
    """Strip surrounding white space."""
    return value.strip() if isinstance(value, str) else value


@FORMATS.register("join_lines", whole=True)
def _join_lines(value: Any, rule: RuleContext, scope: Any) -> Any:
    """Join the values of a repeating path (e.g. "OBX[*]-5" report lines) with newlines."""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value if v)
    return value


# ---------------------------------------------------------------- dates and times

_DTM = re.compile(
    r"^(?P<Y>\d{4})(?:(?P<m>\d{2})(?:(?P<d>\d{2})(?:(?P<H>\d{2})(?:(?P<M>\d{2})"
    r"(?:(?P<S>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?)?)?)?(?P<z>[+-]\d{4})?$"
)


@dataclass(frozen=True)
class Dtm:
    """A parsed HL7 DTM with its precision (how many parts were sent)."""

    dt: datetime  # naive unless the value carried an offset
    has_date: bool
    has_time: bool
    has_seconds: bool
    fraction: str  # digits after the point, as sent
    precision: int  # 1 year, 2 month, 3 day, 4 hour, 5 minute, 6 second


@lru_cache(maxsize=4096)
def parse_dtm(text: str) -> Dtm | None:
    """Parse an HL7 DTM; None when it is not one (caller reports 102)."""
    m = _DTM.match(text)
    if m is None:
        return None
    g = m.groupdict()
    parts = [g["Y"], g["m"], g["d"], g["H"], g["M"], g["S"]]
    precision = sum(1 for p in parts if p is not None)
    frac = g["f"] or ""
    try:
        tz = None
        if g["z"]:
            sign = 1 if g["z"][0] == "+" else -1
            hh, mm = int(g["z"][1:3]), int(g["z"][3:5])
            if hh > 14 or mm > 59:
                return None
            tz = timezone(sign * timedelta(hours=hh, minutes=mm))
        dt = datetime(
            int(g["Y"]),
            int(g["m"] or 1),
            int(g["d"] or 1),
            int(g["H"] or 0),
            int(g["M"] or 0),
            int(g["S"] or 0),
            int(frac.ljust(6, "0")) if frac else 0,
            tzinfo=tz,
        )
    except ValueError:
        return None
    return Dtm(dt, precision >= 3, precision >= 4, precision >= 6, frac, precision)


class _Invalid(ValueError):
    """A value that does not convert; the format turns it into a 102 for its rule."""


_DTM_HELP = "not a valid HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])"


def _local(d: Dtm, tz: tzinfo | None) -> datetime:
    """The value as wall-clock time where the institution is (settings.timezone)."""
    if d.dt.tzinfo is not None and tz is not None and d.has_time:
        return d.dt.astimezone(tz)
    return d.dt


def _offset(d: Dtm, tz: tzinfo | None) -> str:
    """+hh:mm of the value: its own offset, else that of settings.timezone on that day."""
    dt = d.dt
    if dt.tzinfo is None:
        if tz is None:
            return ""
        dt = dt.replace(tzinfo=tz)
    off = dt.utcoffset() or timedelta(0)
    sign = "-" if off < timedelta(0) else "+"
    minutes = abs(int(off.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@lru_cache(maxsize=8192)
def convert_dtm(kind: str, text: str, tz: tzinfo | None) -> str:
    """HL7 DTM -> "da" | "tm" | "dt" | "fhir" (pure, cached); raises _Invalid."""
    d = parse_dtm(text.strip())
    if d is None:
        raise _Invalid(_DTM_HELP)
    if kind == "da":
        if not d.has_date:
            raise _Invalid("date has no day; DICOM DA needs YYYYMMDD")
        return _local(d, tz).strftime("%Y%m%d")
    if kind == "tm":
        if not d.has_time:
            return ""
        return _local(d, tz).strftime("%H%M%S") + (f".{d.fraction}" if d.fraction else "")
    if kind == "dt":
        digits = text.strip()[: (4, 6, 8, 10, 12, 14)[d.precision - 1]]
        if d.fraction:
            digits += "." + d.fraction
        if not d.has_time:
            return digits
        return digits + _offset(d, tz).replace(":", "")
    dt = d.dt
    if d.precision == 1:
        return f"{dt.year:04d}"
    if d.precision == 2:
        return f"{dt.year:04d}-{dt.month:02d}"
    if not d.has_time:
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
    out = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if d.fraction:
        out += "." + d.fraction
    return out + _offset(d, tz).replace("+00:00", "Z")


_ISO = re.compile(
    r"^(?P<Y>\d{4})-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:[T ](?P<H>\d{2}):(?P<M>\d{2})"
    r"(?::(?P<S>\d{2})(?:[.,](?P<f>\d{1,9}))?)?)?)?\s*(?P<z>Z|[+-]\d{2}(?::?\d{2})?)?$"
)


@lru_cache(maxsize=1024)
def iso_to_dtm(text: str) -> str | None:
    """`2026-11-25T08:30:00+01:00` / `2026-11-25 08:30` -> the HL7 DTM it stands for (None: not ISO 8601).

    Fractions are cut to the four digits a DTM carries.
    """
    m = _ISO.match(text.strip())
    if m is None:
        return None
    g = m.groupdict()
    out = "".join(g[k] or "" for k in "YmdHMS")
    if g["f"] and g["S"]:
        out += "." + g["f"][:4]
    z = g["z"]
    if z and g["H"]:
        digits = "0000" if z == "Z" else z[1:].replace(":", "").ljust(4, "0")
        out += ("+" if z == "Z" else z[0]) + digits
    return out


def _date(kind: str, value: Any, rule: RuleContext, scope: Any) -> str:
    if not value:
        return ""
    try:
        return convert_dtm(kind, value, rule.settings.tzinfo)
    except _Invalid as exc:
        dtm = iso_to_dtm(value)
        if dtm is None:
            rule.invalid(DATA_TYPE_ERROR, str(exc))
        try:
            out = convert_dtm(kind, dtm, rule.settings.tzinfo)
        except _Invalid as again:
            rule.invalid(DATA_TYPE_ERROR, str(again))
        rule.warn(scope, DATA_TYPE_ERROR, "ISO 8601 date/time read where HL7 expects a DTM (YYYYMMDDHHMM)", value)
        return out


@FORMATS.register("dtm_to_da")
def dtm_to_da(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 DTM -> DICOM DA (YYYYMMDD), in settings.timezone when the value has an offset."""
    return _date("da", value, rule, scope)


@FORMATS.register("dtm_to_tm")
def dtm_to_tm(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 DTM -> DICOM TM (HHMMSS[.FFFF]) in settings.timezone; "" when the value has no time."""
    return _date("tm", value, rule, scope)


@FORMATS.register("dtm_to_dt")
def dtm_to_dt(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 DTM -> DICOM DT (YYYYMMDDHHMMSS[.F]&ZZXX); offset from the value, else settings.timezone."""
    return _date("dt", value, rule, scope)


@FORMATS.register("dtm_to_fhir", needs_settings=("timezone",))
def dtm_to_fhir(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 DTM -> FHIR date/dateTime, keeping the precision sent; a time always gets an offset."""
    return _date("fhir", value, rule, scope)


# ---------------------------------------------------------------- names


def _name_part(text: str) -> str:
    # a decoded ^ or = inside a name would change the PN's structure
    if "^" in text or "=" in text:
        text = text.replace("^", " ").replace("=", " ")
    return text.strip()


def _comp(parts: tuple[str, ...], i: int) -> str:
    return parts[i] if i < len(parts) else ""


@lru_cache(maxsize=8192)
def person_name(family: str, parts: tuple[str, ...], first: int) -> str:
    """XPN (first=0) or XCN/CNN (first=1, after the ID) components -> DICOM PN.

    HL7: family^given^middle^suffix^prefix; DICOM: family^given^middle^prefix^suffix.
    """
    order = (family, _comp(parts, first + 1), _comp(parts, first + 2), _comp(parts, first + 4), _comp(parts, first + 3))
    return "^".join(_name_part(p) for p in order).rstrip("^")


def _family(value: Any, i: int) -> str:
    """FN is surname&own prefix&...: the surname is the family name (escaped & stays in it)."""
    text = _comp(value, i)
    if "&" in text and hasattr(value, "sub"):
        subs = value.sub(i)
        return subs[0] if subs else ""
    return text


@FORMATS.register("xpn_to_pn", components=True)
def xpn_to_pn(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 XPN (family^given^middle^suffix^prefix) -> DICOM PN family^given^middle^prefix^suffix."""
    return person_name(_family(value, 0), tuple(value), 0) if value else ""


@FORMATS.register("xcn_to_pn", components=True)
def xcn_to_pn(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 XCN (id^family^given^middle^suffix^prefix) -> DICOM PN; the ID is dropped."""
    return person_name(_family(value, 1), tuple(value), 1) if value else ""


# ---------------------------------------------------------------- codes


def _cwe_parts(c: tuple[str, ...]) -> tuple[str, str, str] | None:
    code, text, system = _comp(c, 0), _comp(c, 1), _comp(c, 2)
    if not code and _comp(c, 3):  # only the alternate coding was sent
        code, text, system = _comp(c, 3), _comp(c, 4), _comp(c, 5)
    if not code and not text:
        return None
    return code, text, system


@FORMATS.register("cwe_to_code_item", components=True)
def cwe_to_code_item(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 CWE/CE -> DICOM code item {CodeValue, CodingSchemeDesignator, CodeMeaning}.

    A code without coding system gets settings.coding_scheme (default "L", local): DICOM needs one.
    """
    if not value:
        return None
    parts = _cwe_parts(value)
    if parts is None:
        return None
    code, text, system = parts
    if not code:
        rule.invalid(DATA_TYPE_ERROR, "coded value has text but no code (component 1)")
    return {
        "CodeValue": code,
        "CodingSchemeDesignator": system or rule.settings.coding_scheme,
        "CodeMeaning": text or code,
    }


FHIR_SYSTEMS = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "UCUM": "http://unitsofmeasure.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "RADLEX": "http://radlex.org",
    "CPT": "http://www.ama-assn.org/go/cpt",
}


def fhir_system(name: str, local: str) -> str:
    """FHIR system URI for an HL7 coding system name (HL7 v2-to-FHIR IG table, common ones)."""
    if name in FHIR_SYSTEMS:
        return FHIR_SYSTEMS[name]
    if re.fullmatch(r"HL7\d{4}", name):
        return f"http://terminology.hl7.org/CodeSystem/v2-{name[3:]}"
    if not name or name in ("L", "LOCAL") or name.startswith("99"):
        return local  # settings.local_code_system, or no system at all
    return f"urn:hl7v2:{name}"  # keeps the sender's coding system visible


@FORMATS.register("cwe_to_codeable_concept", components=True)
def cwe_to_codeable_concept(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 CWE/CE -> FHIR CodeableConcept (both codings when an alternate is sent)."""
    if not value:
        return None
    c = value
    codings = []
    for off in (0, 3):
        code, text, system = _comp(c, off), _comp(c, off + 1), _comp(c, off + 2)
        if code:
            coding = {"code": code}
            uri = fhir_system(system, rule.settings.local_code_system)
            if uri:
                coding = {"system": uri, **coding}
            if text:
                coding["display"] = text
            codings.append(coding)
    text = _comp(c, 8) or _comp(c, 1) or _comp(c, 4)
    if not codings and not text:
        return None
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = codings
    if text:
        out["text"] = text
    return out


# ---------------------------------------------------------------- patient

_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}


@FORMATS.register("sex_to_dicom")
def sex_to_dicom(value: Any, rule: RuleContext, scope: Any) -> Any:
    """HL7 table 0001 -> DICOM (0010,0040): M, F, O; A/N -> O; U -> empty; other codes -> 103."""
    if not value:
        return ""
    code = value.strip().upper()
    if code not in _SEX:
        rule.invalid(TABLE_VALUE_NOT_FOUND, "administrative sex is not in HL7 table 0001 (M F O U A N)")
    return _SEX[code]


# ---------------------------------------------------------------- study instance UID

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and _UID.match(uid) is not None


@lru_cache(maxsize=4096)
def accession_uid(root: str, accession: str) -> str:
    """A UID that is always the same for the same accession number (and root)."""
    digest = int.from_bytes(hashlib.sha256(accession.encode("utf-8")).digest()[:16], "big")
    room = 64 - len(root) - 1
    return f"{root}.{digest % (10 ** min(room, 39)) or 1}"


@FORMATS.register("study_uid", options=("accession",))
def study_uid(value: Any, rule: RuleContext, scope: Any) -> Any:
    """Study Instance UID per settings.study_uid_policy when the message carries none.

    accession_based: derived from the accession number (rule key `accession:` names where it is);
    generate: a new random UID; reject: the message is refused (101).
    """
    if value:
        uid = value.strip()
        if not valid_uid(uid):
            rule.invalid(DATA_TYPE_ERROR, "not a valid DICOM UID (digits and dots, at most 64 characters)")
        return uid
    policy = rule.settings.study_uid_policy
    if policy == "reject":
        rule.fail(REQUIRED_FIELD_MISSING, "Study Instance UID missing (study_uid_policy: reject)")
    if policy == "generate":
        from pydicom.uid import generate_uid

        root = rule.settings.uid_root
        return generate_uid(prefix=f"{root}.") if root else generate_uid()
    accession = rule.option_value("accession", scope)
    if not accession:
        rule.fail(
            REQUIRED_FIELD_MISSING,
            "no accession number to derive the Study Instance UID from",
            location=rule.option_location("accession", scope),
        )
    return accession_uid(rule.settings.uid_root or "2.25", accession)


from engine.mapping import formats_fhir  # noqa: E402,F401 - registers the FHIR formats
