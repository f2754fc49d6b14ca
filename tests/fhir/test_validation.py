"""The shape cache in engine.fhir.models accepts exactly what fhir.resources accepts.

Every resource the destination builds goes through it, so it is compared here with the models'
own `model_validate` on the shipped mappings' output and on many damaged copies of it: each
primitive replaced by values that are wrong in a different way, each element dropped, lists
lengthened, nulls put into lists, a choice element doubled. The cache is warm (the undamaged
resource was validated first), which is the path that skips the models.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine.fhir.models import FHIRValidationError, ShapeValidator, model_class, validate_resource
from engine.hl7.er7 import Message
from engine.mapping import load_mapping
from engine.runtime.destinations.fhir import FhirDestination, FhirDestinationConfig

ROOT = Path(__file__).resolve().parents[2]
BAD_VALUES: list[Any] = ["", " ", "x y", "not a date", "2026-13-45", "http://x y", "@@@", 5, 1.5, -1, True, None,
                         "2026-11-25T10:05:00", "2026-11-25T10:05:00+01:00", "F1", "1" * 70]


def shipped_resources() -> list[dict[str, Any]]:
    systems = {"filler": "urn:oid:1.2.3.4.5.4", "mrn": "urn:oid:1.2.3.4.5.1"}
    dest = FhirDestination(FhirDestinationConfig(name="emr", type="fhir", base_url="http://127.0.0.1:9/fhir",
                                                 identifier_systems=systems))
    found: list[dict[str, Any]] = []
    for mapping_name, sample in [("oru-to-diagnosticreport.yaml", "oru_r01.hl7"),
                                 ("orm-to-servicerequest.yaml", "orm_o01_ct.hl7")]:
        mapping = load_mapping(ROOT / "mappings" / mapping_name)
        for out in mapping.run(Message.parse((ROOT / "samples" / "hl7" / sample).read_bytes())):
            found += [e.resource for e in dest.plan(out).entries]
    found.append({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                  "valueQuantity": {"value": 1.5, "unit": "mm", "comparator": "<"},
                  "contained": [{"resourceType": "Patient", "id": "p", "gender": "female"}],
                  "_status": {"extension": [{"url": "http://x", "valueString": "y"}]}})
    return found


def paths(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*at, i))


def get(node: Any, at: tuple[Any, ...]) -> Any:
    for step in at:
        node = node[step]
    return node


def damaged(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for at in paths(resource):
        if not at or at[-1] == "resourceType":
            continue
        value = get(resource, at)
        parent_at, last = at[:-1], at[-1]
        if not isinstance(value, dict | list):
            for bad in BAD_VALUES:
                copy_ = copy.deepcopy(resource)
                get(copy_, parent_at)[last] = bad
                yield copy_
        copy_ = copy.deepcopy(resource)
        del get(copy_, parent_at)[last]
        yield copy_
        if isinstance(value, list):
            for extra in (None, copy.deepcopy(value[0]) if value else None, "text", {}):
                copy_ = copy.deepcopy(resource)
                get(copy_, at).append(extra)
                yield copy_
        if isinstance(value, dict) and isinstance(last, str) and last.startswith("effective"):
            copy_ = copy.deepcopy(resource)
            get(copy_, parent_at)["effectiveDateTime"] = "2026-11-25"
            yield copy_


def models_accept(resource: dict[str, Any], version: str = "R4B") -> bool:
    try:
        model_class(resource["resourceType"], version).model_validate(resource)
    except ValidationError:
        return False
    return True


def cache_accepts(validator: ShapeValidator, resource: dict[str, Any]) -> bool:
    try:
        validator.validate(resource, resource["resourceType"])
    except FHIRValidationError:
        return False
    return True


CASES = [(v, r) for v in ("R4B", "R5") for r in shipped_resources() if v == "R4B" or models_accept(r, "R5")]


@pytest.mark.parametrize(("version", "resource"), CASES, ids=[f"{v}-{r['resourceType']}" for v, r in CASES])
def test_the_cache_decides_as_the_models_do(version: Any, resource: dict[str, Any]) -> None:
    validator = ShapeValidator(version)
    assert cache_accepts(validator, resource) and models_accept(resource, version)
    checked = 0
    for bad in damaged(resource):
        validator.validate(copy.deepcopy(resource), resource["resourceType"])  # warm again (a clear may have run)
        expected = models_accept(bad, version)
        assert cache_accepts(validator, bad) is expected, bad
        assert cache_accepts(validator, bad) is expected, bad  # and again, now that its own shape may be known
        checked += 1
    assert checked > 20
    assert any(v is not None for v in validator.checks.values())  # the fast path was taken at all


def test_a_bad_value_on_a_known_shape_gives_the_models_error_text() -> None:
    good = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"},
            "issued": "2026-11-25T11:55:00+01:00"}
    validate_resource(good)
    with pytest.raises(FHIRValidationError) as exc:
        validate_resource({**good, "issued": "Jane Doe 1980"})
    assert str(exc.value).startswith("DiagnosticReport: issued") and "Jane" not in str(exc.value)
