"""A report output (DiagnosticReport + its OBX lines, as the mapping read them) -> FHIR resources.

The mapping says where each value comes from; this says what the IG says a report looks like,
which no rule can: runs of consecutive text lines (TX/FT/ST) become one `presentedForm`
(text/plain; charset=utf-8, base64) with blank lines kept, the IMPRESSION section (or the
configured heading) becomes `conclusion`, an ED line becomes an attachment with its content type,
an RP line its `url`, and each coded or numeric line becomes an Observation whose identifier is
stable across resends and corrections: the report's identifier + OBX-3 + OBX-4 (never a hash of
the value, so a corrected value updates the same Observation).

The report output (a dict) holds:
    DiagnosticReport: {...}   the report, FHIR element names; identifier systems by name
    Patient: {...}            optional demographics, used when the channel creates patients
    observations: [...]       one per OBX, with FHIR elements and the reading hints below
Hints on each observation (removed before validation): `_type` (OBX-2), `_code_id` (OBX-3.1),
`_sub_id` (OBX-4), `_text` (OBX-5 text lines), `_value` (OBX-5 as sent), `_coded` (OBX-5 as a
CodeableConcept), `_units` (OBX-6 as a CodeableConcept).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

TEXT_TYPES = frozenset({"TX", "FT", "ST"})
CODED_TYPES = frozenset({"CE", "CWE", "CNE"})
VALUE_TYPES = frozenset({"NM", "SN", "CQ", *CODED_TYPES})
MEDIA_TYPES = frozenset({"ED", "RP"})
UCUM = "http://unitsofmeasure.org"

# HL7 table 0191 (type of referenced data) -> MIME top-level type
MIME_TYPES = {"AP": "application", "APPLICATION": "application", "IM": "image", "IMAGE": "image", "TEXT": "text",
              "TX": "text", "AU": "audio", "AUDIO": "audio", "VIDEO": "video", "MULTIPART": "multipart"}
# DiagnosticReport.status -> Observation.status when OBX-11 gives none
OBS_STATUS = {"partial": "preliminary", "appended": "amended"}

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_HEADING = re.compile(r"^[A-Z][A-Z0-9 /&()-]*:$")


class ReportError(ValueError):
    """The output cannot become a report (no identifier to write it idempotently, ...)."""


@dataclass(frozen=True)
class ReportOptions:
    conclusion_heading: str = "IMPRESSION"
    language: str = ""  # presentedForm.language (BCP-47), empty: not said
    title: str = "Report"
    observation_system: str = ""  # identifier system of Observations; empty: the report's key system


def is_report(output: Any) -> bool:
    return isinstance(output, dict) and isinstance(output.get("DiagnosticReport"), dict)


def build_report(output: dict[str, Any], opts: ReportOptions) -> list[dict[str, Any]]:
    """Observations first (the report references them), then the DiagnosticReport."""
    report = {"resourceType": "DiagnosticReport", **output["DiagnosticReport"]}
    key_ident = _key_identifier(report)
    if key_ident is None:
        raise ReportError("DiagnosticReport has no identifier (filler order number or accession number)")
    _effective(report)
    lines = list(output.get("observations") or [])
    observations: list[dict[str, Any]] = []
    forms: list[dict[str, Any]] = []
    text_runs: list[list[tuple[str, str]]] = []
    run: list[tuple[str, str]] | None = None
    seen: set[str] = set()
    for obx in lines:
        kind = str(obx.get("_type", "")).upper()
        if kind in TEXT_TYPES:
            if run is None:
                run = []
                text_runs.append(run)
            run.append((str(obx.get("_code_id", "")), str(obx.get("_text", ""))))
            continue
        run = None
        if kind in MEDIA_TYPES:
            form = _media(kind, obx)
            if form:
                forms.append(form)
        elif kind in VALUE_TYPES:
            observations.append(_observation(obx, kind, report, key_ident, seen, opts))
        # other types (DT, TM, ...) carry nothing the report shows
    text_forms = [_text_form(r, opts) for r in text_runs if any(line for _, line in r)]
    if text_forms or forms:
        report["presentedForm"] = [*text_forms, *forms]
    conclusion = _conclusion([item for r in text_runs for item in r], opts.conclusion_heading)
    if conclusion:
        report["conclusion"] = conclusion
    heading = opts.conclusion_heading.upper()
    codes = [o["valueCodeableConcept"] for o, obx in zip(observations, _value_lines(lines), strict=True)
             if str(obx.get("_code_id", "")).upper() == heading and "valueCodeableConcept" in o]
    if codes:
        report["conclusionCode"] = codes
    if observations:
        report["result"] = [{"reference": f"Observation?identifier={_ref_key(o['identifier'][0])}"}
                            for o in observations]
    return [*observations, report]


def _value_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obx for obx in lines if str(obx.get("_type", "")).upper() in VALUE_TYPES]


def _ref_key(ident: dict[str, Any]) -> str:
    return f"{ident.get('system', '')}|{ident['value']}"


def _key_identifier(resource: dict[str, Any]) -> dict[str, Any] | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            return ident
    return None


def _effective(resource: dict[str, Any]) -> None:
    """A period with only a start is a point in time (OBR-7 without OBR-8)."""
    period = resource.get("effectivePeriod")
    if isinstance(period, dict) and not period.get("end"):
        resource.pop("effectivePeriod")
        if period.get("start"):
            resource["effectiveDateTime"] = period["start"]


def _strip_hints(obx: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obx.items() if not k.startswith("_")}


def _observation(
    obx: dict[str, Any],
    kind: str,
    report: dict[str, Any],
    key_ident: dict[str, Any],
    seen: set[str],
    opts: ReportOptions,
) -> dict[str, Any]:
    obs = {"resourceType": "Observation", **_strip_hints(obx)}
    value = f"{key_ident['value']}-{obx.get('_code_id') or 'OBX'}-{obx.get('_sub_id') or '1'}"
    n = 2
    base = value
    while value in seen:  # the same OBX-3/OBX-4 twice in one report: keep both, in order
        value = f"{base}-{n}"
        n += 1
    seen.add(value)
    ident: dict[str, Any] = {"value": value}
    system = opts.observation_system or key_ident.get("system")
    if system:
        ident["system"] = system
    obs["identifier"] = [ident]
    obs.setdefault("status", OBS_STATUS.get(str(report.get("status")), report.get("status") or "unknown"))
    for element in ("subject", "basedOn", "issued"):
        if element in report and element not in obs:
            obs[element] = report[element]
    if "effectiveDateTime" in report and "effectivePeriod" not in report:
        obs.setdefault("effectiveDateTime", report["effectiveDateTime"])
    elif "effectivePeriod" in report:
        obs.setdefault("effectivePeriod", report["effectivePeriod"])
    obs.update(_value_x(kind, obx))
    return obs


def _quantity(number: str, units: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"value": float(number) if "." in number else int(number)}
    coding = (units or {}).get("coding") or [] if isinstance(units, dict) else []
    if coding:
        c = coding[0]
        q["unit"] = c.get("display") or c.get("code")
        if c.get("system"):
            q["system"] = c["system"]
        if c.get("code"):
            q["code"] = c["code"]
    elif isinstance(units, dict) and units.get("text"):
        q["unit"] = units["text"]
    return q


def _value_x(kind: str, obx: dict[str, Any]) -> dict[str, Any]:
    raw = str(obx.get("_value", "")).strip()
    units = obx.get("_units")
    if kind in CODED_TYPES:
        coded = obx.get("_coded")
        return {"valueCodeableConcept": coded} if coded else {}
    if kind == "NM":
        if _NUMBER.match(raw):
            return {"valueQuantity": _quantity(raw, units)}
        return {"valueString": raw} if raw else {}
    if kind == "CQ":
        number, _, unit = raw.partition("^")
        if _NUMBER.match(number.strip()):
            code, _, rest = unit.partition("&")
            u = {"coding": [{"code": code, **({"system": UCUM} if "UCUM" in rest.upper() else {})}]} if code else units
            return {"valueQuantity": _quantity(number.strip(), u)}
        return {"valueString": raw} if raw else {}
    # SN: comparator ^ num1 ^ separator/suffix ^ num2
    parts = (raw.split("^") + ["", "", "", ""])[:4]
    comparator, num1, sep, num2 = (p.strip() for p in parts)
    if num1 and _NUMBER.match(num1) and not sep:
        q = _quantity(num1, units)
        if comparator in ("<", "<=", ">=", ">"):
            q["comparator"] = comparator
        return {"valueQuantity": q}
    if num1 and num2 and _NUMBER.match(num1) and _NUMBER.match(num2):
        if sep in (":", "/"):
            return {"valueRatio": {"numerator": {"value": _num(num1)}, "denominator": {"value": _num(num2)}}}
        if sep == "-":
            return {"valueRange": {"low": _quantity(num1, units), "high": _quantity(num2, units)}}
    text = " ".join(p for p in parts if p)
    return {"valueString": text} if text else {}


def _num(text: str) -> float | int:
    return float(text) if "." in text else int(text)


def _text_form(run: list[tuple[str, str]], opts: ReportOptions) -> dict[str, Any]:
    text = "\n".join(line for _, line in run)
    form: dict[str, Any] = {
        "contentType": "text/plain; charset=utf-8",
        "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
    }
    if opts.language:
        form["language"] = opts.language
    if opts.title:
        form["title"] = opts.title
    return form


def _conclusion(lines: list[tuple[str, str]], heading: str) -> str:
    """Lines coded with the heading (OBX-3), or those under a heading line (`IMPRESSION:`)."""
    heading = heading.upper()
    out: list[str] = []
    inside = False
    for code, line in lines:
        if code.upper() == heading:
            out.append(line)
            continue
        stripped = line.strip()
        upper = stripped.upper()
        if upper.rstrip(":").strip() == heading:
            inside = True
            continue
        if upper.startswith(heading + ":"):
            inside = True
            rest = stripped[len(heading) + 1 :].strip()
            if rest:
                out.append(rest)
            continue
        if inside and _HEADING.match(stripped):
            inside = False
        if inside:
            out.append(line)
    return "\n".join(out).strip()


def _media(kind: str, obx: dict[str, Any]) -> dict[str, Any] | None:
    """ED: ^type^subtype^encoding^data; RP: pointer^application^type^subtype."""
    parts = (str(obx.get("_value", "")).split("^") + [""] * 5)[:5]
    if kind == "RP":
        url = parts[0].strip()
        if not url:
            return None
        form: dict[str, Any] = {"url": url}
        ctype = _mime(parts[2], parts[3])
        if ctype:
            form["contentType"] = ctype
        return form
    _source, typ, subtype, encoding, data = parts
    payload = _decode(encoding, data)
    if payload is None:
        return None
    return {"contentType": _mime(typ, subtype) or "application/octet-stream", "data": payload}


def _mime(typ: str, subtype: str) -> str:
    top = MIME_TYPES.get(typ.strip().upper(), typ.strip().lower())
    sub = subtype.strip().lower()
    return f"{top}/{sub}" if top and sub else ""


def _decode(encoding: str, data: str) -> str | None:
    """The attachment as base64 (FHIR's form), from HL7 table 0299 encodings."""
    enc = encoding.strip().upper()
    data = data.strip()
    if not data:
        return None
    if enc in ("BASE64", "B64", ""):
        compact = "".join(data.split())
        try:
            base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            return None
        return compact
    if enc == "HEX":
        try:
            return base64.b64encode(bytes.fromhex(data)).decode("ascii")
        except ValueError:
            return None
    return base64.b64encode(data.encode("utf-8")).decode("ascii")  # A: plain text
