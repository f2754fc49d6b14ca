"""Validating resources against the fhir.resources models before anything is queued.

fhir.resources checks structure and types but not the code lists of required bindings, so the
status elements the EMR relies on are checked here too. The error text names elements and the
problem, never the values (they may be PHI).

Why a shape cache: fhir.resources validates every nested element through a Python-level
validator (a model `__init__`, a null check over all of the class's fields, the choice and
required-element checks), ~0.1 ms per Observation and ~0.2 ms per full DiagnosticReport here,
which made validation the largest cost of a result. Everything those validators decide depends
only on the resource's *shape* (its keys, list lengths, the Python type of each value and the
`resourceType` of each resource): the values themselves are only checked by the primitive
types (string, code, dateTime, uri, base64Binary ...). So the first resource of each shape is
validated by the models in full; the next ones of that shape have each primitive value checked
by the very pydantic schema the model uses for that element, which is ~10x cheaper. When a value
fails, the full validation runs again, so the error text is the library's own.
"""

from __future__ import annotations

import importlib
import types
import typing
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

FhirVersion = Literal["R4B", "R5"]

# required bindings fhir.resources does not enforce, for the resources this engine writes or reads
STATUS_CODES: dict[str, frozenset[str]] = {
    "DiagnosticReport": frozenset(
        {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled",
         "entered-in-error", "unknown"}
    ),
    "Observation": frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
    ),
    "ServiceRequest": frozenset(
        {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
    ),
    # the medication resources the engine takes in (reconciliation reads their status)
    "MedicationRequest": frozenset(
        {"active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"}
    ),
    "MedicationDispense": frozenset(
        {"preparation", "in-progress", "cancelled", "on-hold", "completed", "entered-in-error", "stopped",
         "declined", "unknown"}
    ),
    "MedicationAdministration": frozenset(
        {"in-progress", "not-done", "on-hold", "completed", "entered-in-error", "stopped", "unknown"}
    ),
    "MedicationStatement": frozenset(
        {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"}
    ),
}
SHAPES_KEPT = 2048  # distinct resource shapes remembered per version (a feed has tens to hundreds)


class FHIRValidationError(ValueError):
    """A resource does not validate; the text lists element paths and problems, no values."""


@lru_cache(maxsize=64)
def model_class(resource_type: str, version: FhirVersion = "R4B") -> Any:
    package = "fhir.resources.R4B" if version == "R4B" else "fhir.resources"
    try:
        module = importlib.import_module(package)
        return module.get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError) as exc:
        raise FHIRValidationError(f"{resource_type!r} is not a FHIR {version} resource type") from exc


def validate_resource(resource: dict[str, Any], version: FhirVersion = "R4B") -> None:
    """Raise FHIRValidationError when `resource` would be refused by a conformant server."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise FHIRValidationError("resourceType is missing")
    _VALIDATORS[version].validate(resource, rtype)
    codes = STATUS_CODES.get(rtype)
    status = resource.get("status")
    if codes is not None and status not in codes:
        shown = "missing" if status is None else "not a code of its value set"
        raise FHIRValidationError(f"{rtype}.status: {shown} (one of {', '.join(sorted(codes))})")


# Elements this engine writes that R5 renamed or retyped: (resource, R4 element) -> how to carry it
def _concept(value: Any) -> Any:
    return {"concept": value} if isinstance(value, dict) else value


def _reasons(resource: dict[str, Any]) -> None:
    """R4 reasonCode (CodeableConcept) + reasonReference (Reference) -> R5 reason (CodeableReference)."""
    codes = resource.pop("reasonCode", None) or []
    refs = resource.pop("reasonReference", None) or []
    reasons = [{"concept": c} for c in codes if isinstance(c, dict)] + [{"reference": r} for r in refs
                                                                        if isinstance(r, dict)]
    if reasons:
        resource["reason"] = [*(resource.get("reason") or []), *reasons]


def for_version(resource: dict[str, Any], version: FhirVersion) -> dict[str, Any]:
    """The resource as `version` spells it. Mappings are written in R4 terms; for R5 the few
    elements of the engine's resources that R5 changed are carried over (ServiceRequest.code and
    .reason became CodeableReference). Anything else R5 refuses is left for validation to report."""
    if version != "R5" or resource.get("resourceType") != "ServiceRequest":
        return resource
    out = dict(resource)
    code = out.get("code")
    if isinstance(code, dict) and "concept" not in code and "reference" not in code:
        out["code"] = _concept(code)
    if "reasonCode" in out or "reasonReference" in out:
        _reasons(out)
    return out


def describe(exc: ValidationError, limit: int = 5) -> str:
    """'a.b: message; ...' from a pydantic error, without the offending input values."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__") or "(resource)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# -- the shape cache ---------------------------------------------------------------------------
Check = Callable[[Any], Any]


_OPEN, _LIST, _CLOSE = object(), object(), object()  # markers in a shape (never equal to a key or a type)


def shape_of(node: Any, tokens: list[Any], leaves: list[Any]) -> None:
    """A picture of everything but the primitive values, as flat tokens: a dict is its keys
    between markers, a list its items, a value its type (appended to `leaves`, in document order);
    a `resourceType` keeps its value (it picks the model)."""
    kind = node.__class__
    if kind is dict:
        tokens.append(_OPEN)
        for k, v in node.items():
            tokens.append(k)
            if k == "resourceType" and v.__class__ is str:
                tokens.append(v)
            else:
                shape_of(v, tokens, leaves)
        tokens.append(_CLOSE)
    elif kind is list:
        tokens.append(_LIST)
        for v in node:
            shape_of(v, tokens, leaves)
        tokens.append(_CLOSE)
    else:
        tokens.append(kind)
        leaves.append(node)


class _Unknown(Exception):
    """The walk met a field type it does not understand: that shape is always validated in full."""


class ShapeValidator:
    """fhir.resources validation, in full once per resource shape, then primitive values only."""

    def __init__(self, version: FhirVersion) -> None:
        self.version = version
        self.checks: dict[Any, list[Check | None] | None] = {}  # shape -> a check per leaf; None: always in full
        self._adapters: dict[Any, Check] = {}

    def validate(
        self, resource: dict[str, Any], rtype: str, full: Callable[[dict[str, Any], str], None] | None = None
    ) -> None:
        """`full` is the in-full validation (default: raise FHIRValidationError with the library's
        text); a caller that reads the pydantic errors itself (the FHIR input adapter) passes its own."""
        tokens: list[Any] = []
        leaves: list[Any] = []
        shape_of(resource, tokens, leaves)
        shape = tuple(tokens)  # keys, types, markers and resourceType strings: all hashable
        checks = self.checks.get(shape)
        if checks is not None:
            try:
                for value, check in zip(leaves, checks, strict=True):
                    if check is not None:
                        check(value)
                return
            except Exception:  # noqa: BLE001 - whatever a value check raises, the models decide below
                pass  # and the full validation gives the library's own error text
        (full or self._full)(resource, rtype)
        if shape not in self.checks:
            if len(self.checks) >= SHAPES_KEPT:
                self.checks.clear()
            try:
                found: list[Check | None] = []
                self._walk(resource, model_class(rtype, self.version), found)
                self.checks[shape] = found if len(found) == len(leaves) else None
            except _Unknown:
                self.checks[shape] = None

    def _full(self, resource: dict[str, Any], rtype: str) -> None:
        cls = model_class(rtype, self.version)
        try:
            cls.model_validate(resource)
        except ValidationError as exc:
            raise FHIRValidationError(f"{rtype}: {describe(exc)}") from None

    # the walk mirrors shape_of's order: one check (or None) per leaf
    def _walk(self, node: dict[str, Any], cls: Any, out: list[Check | None]) -> None:
        fields = _fields(cls)
        for key, value in node.items():
            if key == "resourceType" and type(value) is str:
                continue
            if key not in fields:
                raise _Unknown(key)
            self._value(value, fields[key], out)

    def _value(self, value: Any, annotation: Any, out: list[Check | None]) -> None:
        inner, is_list = _unwrap(annotation)
        if is_list and type(value) is list:
            for item in value:
                self._item(item, inner, out)
        elif not is_list:
            self._item(value, inner, out)
        else:
            raise _Unknown(annotation)

    def _item(self, value: Any, annotation: Any, out: list[Check | None]) -> None:
        from fhir_core.types import FhirBase, FhirElementOrResourceBase

        kind = type(value)
        if kind is dict:  # the same class tests as shape_of: a dict subclass is a leaf there
            if isinstance(annotation, type) and issubclass(annotation, FhirElementOrResourceBase):
                rtype = value.get("resourceType")
                if not isinstance(rtype, str):
                    raise _Unknown(annotation)
                self._walk(value, model_class(rtype, self.version), out)
            elif isinstance(annotation, type) and issubclass(annotation, FhirBase):
                self._walk(value, annotation.get_model_klass(), out)
            else:
                raise _Unknown(annotation)
        elif kind is list:
            raise _Unknown(annotation)
        elif value is None:
            out.append(None)  # the shape says None here, and the full validation took it
        else:
            if isinstance(annotation, type) and issubclass(annotation, FhirBase):
                raise _Unknown(annotation)
            out.append(self._adapter(annotation))

    def _adapter(self, annotation: Any) -> Check:
        check = self._adapters.get(annotation)
        if check is None:
            check = self._adapters[annotation] = TypeAdapter(annotation).validator.validate_python
        return check


@cache
def _fields(cls: Any) -> dict[str, Any]:
    """Element name and alias -> annotation (the models take both: populate_by_name)."""
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        out[name] = info.annotation
        if info.alias:
            out[info.alias] = info.annotation
    return out


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Optional[List[X]] -> (X, True); Optional[X] -> (X, False)."""
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or origin is types.UnionType:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                raise _Unknown(annotation)
            annotation = args[0]
        elif origin is list and not is_list:
            (annotation,) = typing.get_args(annotation)
            is_list = True
        else:
            return annotation, is_list


_VALIDATORS: dict[str, ShapeValidator] = {"R4B": ShapeValidator("R4B"), "R5": ShapeValidator("R5")}


def shape_validator(version: FhirVersion = "R4B") -> ShapeValidator:
    """The process's shape cache for `version` (shared by the builders and the FHIR input adapter)."""
    return _VALIDATORS[version]
