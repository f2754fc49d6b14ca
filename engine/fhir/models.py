"""Validating resources against the fhir.resources models before anything is queued.

fhir.resources checks structure and types but not the code lists of required bindings, so the
status elements the EMR relies on are checked here too. The error text names elements and the
problem, never the values (they may be PHI).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Literal

from pydantic import ValidationError

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
    cls = model_class(rtype, version)
    try:
        cls.model_validate(resource)
    except ValidationError as exc:
        raise FHIRValidationError(f"{rtype}: {describe(exc)}") from None
    codes = STATUS_CODES.get(rtype)
    status = resource.get("status")
    if codes is not None and status not in codes:
        shown = "missing" if status is None else "not a code of its value set"
        raise FHIRValidationError(f"{rtype}.status: {shown} (one of {', '.join(sorted(codes))})")


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
