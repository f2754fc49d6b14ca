"""From mapping outputs to the resources one delivery writes (pure, no I/O, nothing of HL7).

A mapping with `output: fhir` gives, per output, either one resource (a dict with
`resourceType`) or a *report* (a dict with a `DiagnosticReport` key, see `engine.fhir.results`).
What this module adds is what the analyst should not have to spell out in every mapping:

- identifier systems by name: `{system: accession, value: ...}` takes the channel's URI for
  `accession` (`identifier_systems:` on the destination), so one mapping serves many sites; a
  name the channel does not set becomes `urn:engine:id:<name>`;
- references to the patient, as the channel says (`patient:`): a logical reference by
  identifier, a conditional reference the server resolves, or a Patient created if none exists;
- the conditional key of every resource (its first identifier), which makes each write
  idempotent: `PUT Type?identifier=system|value` updates the one the server has or creates it.
References between resources of one delivery are written as conditional references
(`Observation?identifier=s|v`); the writer turns them into `urn:uuid:` (transaction) or literal
(conditional updates) references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

PatientMode = Literal["identifier", "conditional", "create"]


@dataclass
class Planned:
    """One resource to write and the identifier that finds it on the server."""

    resource: dict[str, Any]
    key: str  # "system|value" (the conditional search), "" when the resource has none
    create_only: bool = False  # POST with If-None-Exist (a Patient we do not own), not an update

    @property
    def type(self) -> str:
        return str(self.resource["resourceType"])

    @property
    def search(self) -> str:
        """`Type?identifier=system|value`, URL-encoded."""
        return f"{self.type}?identifier={quote(self.key, safe='')}"

    @property
    def ref(self) -> str:
        return f"{self.type}?identifier={self.key}"


@dataclass
class Plan:
    """What one payload writes, in dependency order (what is referenced comes first)."""

    entries: list[Planned] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"entries": [{"resource": e.resource, "key": e.key, "create_only": e.create_only} for e in self.entries]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls([Planned(e["resource"], e["key"], bool(e.get("create_only"))) for e in data["entries"]])

    def first(self, resource_type: str) -> Planned | None:
        return next((e for e in self.entries if e.type == resource_type), None)


def identifier_key(identifier: dict[str, Any]) -> str:
    return f"{identifier.get('system', '')}|{identifier['value']}"


def resolve_systems(node: Any, systems: dict[str, str]) -> Any:
    """Replace identifier system names by the channel's URIs and drop identifiers without a value."""
    if isinstance(node, list):
        out = [resolve_systems(v, systems) for v in node]
        return [v for v in out if v is not _DROP]
    if not isinstance(node, dict):
        return node
    out_d: dict[str, Any] = {}
    for key, value in node.items():
        vkind = value.__class__
        if key == "identifier":
            value = _identifiers(value, systems)
            if value is None:
                continue
        elif vkind is str:  # the common case, no recursion
            if not value:
                continue
            if key == "reference" and "?identifier=" in value:
                head, _, ident = value.partition("?identifier=")
                system, bar, rest = ident.partition("|")
                if bar:
                    value = f"{head}?identifier={_system(system, systems)}{bar}{rest}"
        elif isinstance(value, dict | list):
            value = resolve_systems(value, systems)
            if value is _DROP or not value:
                continue
        elif value is None:
            continue
        out_d[key] = value
    if "identifier" in node and "display" not in out_d and out_d.keys() <= {"type", "display"}:
        return _DROP  # a logical reference whose identifier came out empty: no reference at all
    return out_d


_DROP: Any = object()


def _identifiers(value: Any, systems: dict[str, str]) -> Any:
    def one(ident: Any) -> dict[str, Any] | None:
        if not isinstance(ident, dict) or not ident.get("value"):
            return None
        ident = dict(ident)
        system = ident.get("system")
        if isinstance(system, str) and system:
            ident["system"] = _system(system, systems)
        return ident

    if isinstance(value, list):
        found = [i for i in (one(v) for v in value) if i is not None]
        return found or None
    return one(value)


def _system(name: str, systems: dict[str, str]) -> str:
    if name in systems:
        return systems[name]
    if ":" not in name:
        return f"urn:engine:id:{name}"  # a name the channel did not set: still a URI
    return name


def key_of(resource: dict[str, Any]) -> str:
    """The conditional key: the first identifier that has a value."""
    idents = resource.get("identifier")
    if isinstance(idents, dict):
        idents = [idents]
    for ident in idents or []:
        if isinstance(ident, dict) and ident.get("value"):
            return identifier_key(ident)
    return ""


def apply_patient_mode(node: Any, mode: PatientMode) -> Any:
    """Rewrite logical Patient references (`{type: Patient, identifier: ...}`) as the channel wants."""
    if mode == "identifier":
        return node
    if isinstance(node, list):
        return [apply_patient_mode(v, mode) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Patient" and isinstance(node.get("identifier"), dict) and "reference" not in node:
        ref = {"reference": f"Patient?identifier={identifier_key(node['identifier'])}"}
        if "display" in node:
            ref["display"] = node["display"]
        return ref
    return {k: apply_patient_mode(v, mode) for k, v in node.items()}


def patient_reference_identifiers(node: Any) -> list[dict[str, Any]]:
    """Every identifier used in a logical Patient reference (to create that Patient)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, list):
        for v in node:
            found += patient_reference_identifiers(v)
    elif isinstance(node, dict):
        if node.get("type") == "Patient" and isinstance(node.get("identifier"), dict):
            found.append(node["identifier"])
        else:
            for v in node.values():
                found += patient_reference_identifiers(v)
    return found


def plan_resources(
    resources: list[dict[str, Any]],
    systems: dict[str, str],
    patient_mode: PatientMode,
    patient: dict[str, Any] | None = None,
) -> Plan:
    """Resolve systems, patient references and keys of the resources of one payload.

    `patient` is the mapping's Patient (demographics) for `patient: create`; without it a
    Patient holding only the identifier is created.
    """
    resolved = [resolve_systems(r, systems) for r in resources]
    plan = Plan()
    if patient_mode == "create":
        idents = [i for r in resolved for i in patient_reference_identifiers(r)]
        if idents:
            body = resolve_systems(patient, systems) if patient else {}
            body = {"resourceType": "Patient", **{k: v for k, v in body.items() if k != "resourceType"}}
            body.setdefault("identifier", [idents[0]])
            plan.entries.append(Planned(body, identifier_key(idents[0]), create_only=True))
    for r in resolved:
        plan.entries.append(Planned(apply_patient_mode(r, patient_mode), key_of(r)))
    return plan
