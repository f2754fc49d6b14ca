"""The `fhir` input adapter: a FHIR JSON resource (or Bundle) in, an HTTP answer out.

Everything FHIR about an HTTP channel sits here: parsing the JSON, validating it once with
fhir.resources (R4B), the unit's identity (resourceType; `Type/id` plus a digest of the body, so a
resend of the same content is a duplicate and a changed resource, a request stopped, is new),
splitting a batch Bundle into one unit per entry and answering with OperationOutcomes that name
the element in FHIRPath. A transaction Bundle is one unit: a failing entry refuses it whole.

Answers are stored with the message, so they must hold no PHI: an answer is a small envelope
(`{"http": 201, "location": "Type/id"}` or `{"http": 422, "outcome": OperationOutcome}`) that the
HTTP source turns into the response; on success the body sent back is the resource as received.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pydantic_core
from pydantic import ValidationError

from engine.errors import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_MESSAGE_TYPE,
    ProcessingError,
    ProcessingWarning,
)
from engine.fhir.models import STATUS_CODES, FHIRValidationError, FhirVersion, model_class, shape_validator
from engine.inputs import AdapterOptions, AnswerBuilder, Outcome, Received

__all__ = ["FHIRAdapter", "FHIROptions", "FHIRView", "HttpAnswer", "read_answer"]

CONTENT_TYPE = "application/fhir+json"
PARSE_ERROR = 100  # the body is not a JSON object: HTTP 400 (HL7 table 0357 has no better code)


class FHIROptions(AdapterOptions):
    type: Literal["fhir"] = "fhir"
    version: FhirVersion = "R4B"
    # an element the FHIR version does not define (an R5 element, a typo): dropped from validation
    # with a warning (the resource is kept as received), or refused with 422
    unknown_elements: Literal["warn", "refuse"] = "warn"


class FHIRView:
    """The resource as received and validated (C5): `.resource`, and `get("subject.reference")`."""

    __slots__ = ("refusal", "resource")

    def __init__(self, resource: dict[str, Any]) -> None:
        self.resource = resource
        self.refusal: ProcessingError | None = None  # found while parsing, raised by `check`

    def get(self, path: str) -> str:
        """A dotted path; a list gives its first item (or the item at a numeric step)."""
        value: Any = self.resource
        for step in path.split("."):
            if isinstance(value, list):
                if step.isdigit():
                    value = value[int(step)] if int(step) < len(value) else None
                    continue
                value = value[0] if value else None
            if not isinstance(value, dict):
                return ""
            value = value.get(step)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None or isinstance(value, dict | list):
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    def __repr__(self) -> str:  # never the content: it is PHI
        return f"FHIRView({self.resource.get('resourceType')}/{self.resource.get('id', '')})"


class FHIRInputError(ProcessingError):
    """A refusal with the FHIR issue code and HTTP status it is answered with."""

    def __init__(self, text: str, code: int, expression: str, *, http: int, issue: str) -> None:
        super().__init__(text, code, expression, ack_code="AR" if http == 400 else "AE")
        self.http = http
        self.issue = issue


# -- answers ---------------------------------------------------------------------------------
@dataclass
class HttpAnswer:
    status: int
    location: str = ""
    body: dict[str, Any] | None = None  # an OperationOutcome or a response Bundle; None: the resource itself
    warnings: list[dict[str, Any]] = field(default_factory=list)  # OperationOutcome issues of severity warning


def _envelope(status: int, *, location: str = "", body: dict[str, Any] | None = None,
              warnings: list[dict[str, Any]] | None = None) -> str:
    out: dict[str, Any] = {"http": status}
    if location:
        out["location"] = location
    if body is not None:
        out["body"] = body
    if warnings:  # issues of severity warning, answered with a batch entry (element paths, no values)
        out["warnings"] = warnings
    return pydantic_core.to_json(out).decode()  # compact; ~3x json.dumps on a 60-entry response Bundle


def read_answer(text: str | bytes) -> HttpAnswer:
    """The stored answer as the HTTP source sends it back."""
    try:
        data = pydantic_core.from_json(text)
        return HttpAnswer(int(data["http"]), str(data.get("location", "")), data.get("body"),
                          list(data.get("warnings") or []))
    except (ValueError, KeyError, TypeError):
        return HttpAnswer(500, body=operation_outcome("exception", "the stored answer cannot be read"))


def operation_outcome(issue: str, diagnostics: str, expression: str = "", severity: str = "error") -> dict[str, Any]:
    entry: dict[str, Any] = {"severity": severity, "code": issue, "diagnostics": diagnostics}
    if expression:
        entry["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [entry]}


def _warnings_outcome(warnings: Sequence[ProcessingWarning]) -> list[dict[str, Any]]:
    return [
        {"severity": "warning", "code": "value", "diagnostics": w.text,
         **({"expression": [w.location]} if w.location else {})}
        for w in warnings
    ]


def error_answer(error: ProcessingError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OperationOutcome) for a refusal from any stage (parse, check, a destination)."""
    if isinstance(error, FHIRInputError):
        return error.http, operation_outcome(error.issue, error.text, error.location)
    if error.code == APPLICATION_INTERNAL_ERROR:
        return 500, operation_outcome("exception", error.text, error.location)
    if error.code == UNSUPPORTED_MESSAGE_TYPE:
        return 422, operation_outcome("not-supported", error.text, error.location)
    return 422, operation_outcome("processing" if not error.location else "value", error.text, error.location)


# -- reading the body -----------------------------------------------------------------------
def _load(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise FHIRInputError("the body is not valid JSON", PARSE_ERROR, "", http=400, issue="structure") from None
    if not isinstance(data, dict):
        raise FHIRInputError("the body is not a JSON object", PARSE_ERROR, "", http=400, issue="structure")
    rtype = data.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FHIRInputError("resourceType is missing", REQUIRED_FIELD_MISSING, "resourceType", http=400,
                             issue="required")
    return data


def _reference(resource: dict[str, Any]) -> str:
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            return ref["reference"]
    return ""


def _entries(bundle: dict[str, Any]) -> list[Any]:
    entries = bundle.get("entry")
    return entries if isinstance(entries, list) else []


def _fhirpath(root: str, loc: Sequence[Any]) -> str:
    """('entry', 0, 'resource', 'authoredOn') -> 'Bundle.entry[0].resource.authoredOn'."""
    out = root
    for step in loc:
        if isinstance(step, int):
            out += f"[{step}]"
        elif step != "__root__" and not str(step).startswith(("function-", "union[", "json-or-python")):
            out += f".{step}"
    return out


def _control_id(resource: dict[str, Any], raw: bytes) -> str:
    rid = resource.get("id")
    rid = rid if isinstance(rid, str) else ""
    return f"{resource['resourceType']}/{rid}#{hashlib.sha256(raw).hexdigest()[:16]}"


class FHIRAdapter:
    name: ClassVar[str] = "fhir"
    Options: ClassVar[type[AdapterOptions]] = FHIROptions
    content_type: ClassVar[str] = CONTENT_TYPE
    type_location: ClassVar[str] = "resourceType"

    def __init__(self, options: AdapterOptions) -> None:
        assert isinstance(options, FHIROptions)
        self.options = options

    def parse(self, raw: bytes) -> Received:
        """JSON and identity; validation too, so that unknown elements dropped on the way become the
        unit's warnings (a refusal is kept on the view and raised by `check`, so the stored error
        row has its type and control id)."""
        resource = _load(raw)
        patient = _reference(resource)
        if resource["resourceType"] == "Bundle":
            refs = {_reference(e["resource"]) for e in _entries(resource)
                    if isinstance(e, dict) and isinstance(e.get("resource"), dict)} - {""}
            patient = refs.pop() if len(refs) == 1 else ""
        view = FHIRView(resource)
        warnings: list[ProcessingWarning] = []
        try:
            self._validate_all(resource, warnings)
        except FHIRInputError as exc:
            view.refusal = exc
        return Received(
            view=view,
            message_type=resource["resourceType"],
            control_id=_control_id(resource, raw),
            patient_id=patient,
            warnings=warnings,
        )

    def check(self, unit: Received) -> None:
        assert isinstance(unit.view, FHIRView)
        if unit.view.refusal is not None:
            raise unit.view.refusal

    def _validate_all(self, resource: dict[str, Any], warnings: list[ProcessingWarning]) -> None:
        """fhir.resources validation, each resource once (a Bundle's entries each with its own
        class, then the Bundle without them: faster than through the Bundle, and the class is found
        once per type), and the status codes of required bindings fhir.resources does not enforce."""
        rtype = resource["resourceType"]
        if rtype != "Bundle":
            self._validate(resource, rtype, warnings)
            return
        skeleton_entries = []
        for i, entry in enumerate(_entries(resource)):
            inner = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(inner, dict):
                self._validate(inner, f"Bundle.entry[{i}].resource", warnings)
                entry = {k: v for k, v in entry.items() if k != "resource"}
            skeleton_entries.append(entry)
        skeleton = dict(resource)
        if "entry" in resource:
            skeleton["entry"] = skeleton_entries
        self._validate(skeleton, "Bundle", warnings)

    def _validate(self, resource: dict[str, Any], where: str, warnings: list[ProcessingWarning]) -> None:
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str):
            raise FHIRInputError(f"{where}.resourceType is missing", REQUIRED_FIELD_MISSING, f"{where}.resourceType",
                                 http=400, issue="required")
        try:
            cls = model_class(rtype, self.options.version)
        except FHIRValidationError:
            at = "resourceType" if where == rtype else f"{where}.resourceType"
            raise FHIRInputError(f"{rtype} is not a FHIR {self.options.version} resource type",
                                 UNSUPPORTED_MESSAGE_TYPE, at, http=400, issue="not-supported") from None
        try:  # in full once per resource shape, then only its primitive values (engine.fhir.models)
            shape_validator(self.options.version).validate(resource, rtype, lambda r, _t: cls.model_validate(r))
        except ValidationError as exc:
            errors = exc.errors()
            unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
            if unknown and len(unknown) == len(errors) and self.options.unknown_elements == "warn":
                trimmed = copy.deepcopy(resource)
                for e in unknown:
                    _drop(trimmed, e.get("loc", ()))
                self._validate(trimmed, where, [])  # what remains must be valid
                for e in unknown:
                    at = _fhirpath(where, e.get("loc", ()))
                    warnings.append(ProcessingWarning(f"unknown element {at} ignored (not in FHIR "
                                                      f"{self.options.version})", DATA_TYPE_ERROR, at))
                return
            real = [e for e in errors if e.get("type") != "extra_forbidden"] or errors
            first = real[0]
            at = _fhirpath(where, first.get("loc", ()))
            more = len(errors) - 1
            text = f"{at}: {first.get('msg', 'invalid')}" + (f" (and {more} more)" if more else "")
            code = REQUIRED_FIELD_MISSING if first.get("type") == "missing" else DATA_TYPE_ERROR
            issue = "required" if code == REQUIRED_FIELD_MISSING else "value"
            raise FHIRInputError(text, code, at, http=422, issue=issue) from None
        _check_status(resource, where)

    def answer(self, unit: Received) -> AnswerBuilder:
        assert isinstance(unit.view, FHIRView)
        resource = unit.view.resource
        rid = resource.get("id")
        location = f"{resource['resourceType']}/{rid}" if isinstance(rid, str) and rid else ""
        bundle_type = resource.get("type") if resource["resourceType"] == "Bundle" else None

        def build(_status: str, error: ProcessingError | None, warnings: Sequence[ProcessingWarning]) -> str:
            if error is not None:
                status, outcome = error_answer(error)
                outcome["issue"] += _warnings_outcome(warnings)
                return _envelope(status, body=outcome)
            if bundle_type == "transaction":
                return _envelope(200, body=_transaction_response(resource))
            if bundle_type == "batch":  # one without entries (a batch with entries is split)
                return _envelope(200, body={"resourceType": "Bundle", "type": "batch-response", "entry": []})
            return _envelope(201, location=location, warnings=_warnings_outcome(warnings))

        return build

    def refusal(self, raw: bytes) -> tuple[AnswerBuilder, str]:
        def build(_status: str, error: ProcessingError | None, _warnings: Sequence[ProcessingWarning]) -> str:
            err = error or ProcessingError("refused", PARSE_ERROR)
            status, outcome = error_answer(err)
            return _envelope(400 if status >= 500 else status, body=outcome)

        return build, "utf-8"

    def split(self, raw: bytes) -> list[bytes] | None:
        """A batch Bundle: each entry's resource on its own (an entry without one is kept as it is,
        to be stored and refused). Anything else, a transaction too, is one unit."""
        if b'"batch"' not in raw:  # cheap: most bodies are single resources or transactions
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or data.get("resourceType") != "Bundle" or data.get("type") != "batch":
            return None
        parts = []
        for entry in _entries(data):
            inner = entry.get("resource") if isinstance(entry, dict) else None
            parts.append(json.dumps(inner if isinstance(inner, dict) else entry, ensure_ascii=False).encode("utf-8"))
        return parts or None

    def combine(self, outcomes: Sequence[Outcome]) -> bytes:
        """A batch-response Bundle: one entry per part, in order, each with its status."""
        entries = []
        for o in outcomes:
            ans = read_answer(o.answer)
            response: dict[str, Any] = {"status": _status_text(ans.status)}
            if ans.location:
                response["location"] = ans.location
            if ans.body is not None and ans.body.get("resourceType") == "OperationOutcome":
                response["outcome"] = ans.body
            elif ans.warnings:
                response["outcome"] = {"resourceType": "OperationOutcome", "issue": ans.warnings}
            entries.append({"response": response})
        bundle = {"resourceType": "Bundle", "type": "batch-response", "entry": entries}
        return _envelope(200, body=bundle).encode("utf-8")


def _drop(node: Any, loc: Sequence[Any]) -> None:
    """Remove the element at a pydantic error location from a (copied) resource."""
    steps = [p for p in loc if not (isinstance(p, str) and p.startswith(("function-", "union[", "json-or-python")))]
    for step in steps[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
    if steps and isinstance(node, dict):
        node.pop(steps[-1], None)


def _check_status(resource: dict[str, Any], where: str) -> None:
    codes = STATUS_CODES.get(str(resource.get("resourceType")))
    status = resource.get("status")
    if codes is None or status in codes:
        return
    shown = "is missing" if status is None else "is not a code of its value set"
    code = REQUIRED_FIELD_MISSING if status is None else TABLE_VALUE_NOT_FOUND
    raise FHIRInputError(f"{where}.status {shown} (one of {', '.join(sorted(codes))})", code, f"{where}.status",
                         http=422, issue="required" if status is None else "code-invalid")


def _transaction_response(bundle: dict[str, Any]) -> dict[str, Any]:
    entries = []
    for entry in _entries(bundle):
        inner = entry.get("resource") if isinstance(entry, dict) else None
        response: dict[str, Any] = {"status": "201 Created"}
        if isinstance(inner, dict) and isinstance(inner.get("id"), str):
            response["location"] = f"{inner.get('resourceType')}/{inner['id']}"
        entries.append({"response": response})
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 409: "Conflict",
            422: "Unprocessable Entity", 500: "Internal Server Error"}


def _status_text(status: int) -> str:
    return f"{status} {_REASONS.get(status, '')}".strip()
