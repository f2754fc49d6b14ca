"""R5 per channel (`fhir_version: R5` on the FHIR destination): resources validated against
fhir.resources' R5 models, the elements R5 retyped carried over, what R5 refuses refused."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from engine.errors import ProcessingError
from engine.fhir.models import FHIRValidationError, model_class, validate_resource
from engine.hl7.er7 import Message
from engine.mapping import load_mapping
from engine.runtime.destinations.fhir import FhirDestination, FhirDestinationConfig

kit = sys.modules["fhir_servers"]  # loaded by conftest.py (tests are not a package)
ROOT = Path(__file__).resolve().parents[2]
FILLER = "urn:oid:1.2.3.4.5.4"


def destination(version: str) -> FhirDestination:
    return FhirDestination(FhirDestinationConfig(name="emr", type="fhir", base_url="http://127.0.0.1:9/fhir",
                                                 fhir_version=version, identifier_systems={"filler": FILLER}))


def outputs(mapping: str, sample: str) -> list[Any]:
    raw = (ROOT / "samples" / "hl7" / sample).read_bytes()
    return load_mapping(ROOT / "mappings" / mapping).run(Message.parse(raw))


def test_the_version_picks_the_models() -> None:
    assert model_class("DiagnosticReport", "R5").__module__ == "fhir.resources.diagnosticreport"
    assert model_class("DiagnosticReport", "R4B").__module__ == "fhir.resources.R4B.diagnosticreport"


def test_a_report_validates_as_r5() -> None:
    [out] = outputs("oru-to-diagnosticreport.yaml", "oru_r01.hl7")
    plan = destination("R5").plan(out)
    assert [e.type for e in plan.entries] == ["Observation", "DiagnosticReport"]
    for entry in plan.entries:
        validate_resource(entry.resource, "R5")


def test_service_request_code_and_reason_become_codeable_references_in_r5() -> None:
    [out] = outputs("orm-to-servicerequest.yaml", "orm_o01_ct.hl7")
    [r4] = [e.resource for e in destination("R4B").plan(out).entries]
    [r5] = [e.resource for e in destination("R5").plan(out).entries]
    assert r5["code"] == {"concept": r4["code"]}
    assert "reasonCode" not in r5 and r5["reason"] == [{"concept": c} for c in r4["reasonCode"]]
    with pytest.raises(FHIRValidationError, match="code"):
        validate_resource(r4, "R5")  # the R4 shape is not R5: the models really are R5's
    with pytest.raises(FHIRValidationError, match="code"):
        validate_resource(r5, "R4B")


def test_an_element_r5_dropped_refuses_the_message_with_the_validation_text() -> None:
    [out] = outputs("orm-to-servicerequest.yaml", "orm_o01_ct.hl7")
    out["locationCode"] = [{"text": "CT room 2"}]  # R4 ServiceRequest.locationCode; R5 has location
    destination("R4B").plan(out)
    with pytest.raises(ProcessingError, match="invalid FHIR ServiceRequest: locationCode") as exc:
        destination("R5").plan(out)
    assert "CT room 2" not in str(exc.value)


async def test_an_r5_channel_delivers_its_report(sekmet: Any, engine_at: Any, tmp_path: Path) -> None:
    channels = tmp_path / "channels"
    channels.mkdir()
    text = (kit.ROOT / "channels" / "ris-results.yaml").read_text()
    anchor = "    mode: ${EMR_FHIR_MODE:-transaction}"
    assert anchor in text
    (channels / "ris-results.yaml").write_text(text.replace(anchor, "    fhir_version: R5\n" + anchor))
    filler = kit.uid()
    async with engine_at(sekmet.base_url, channels=channels) as app:
        [emr] = [d for d in app.channels["ris-results"].pipeline.destinations if d.name == "emr"]
        assert emr.config.fhir_version == "R5"
        await kit.send(app, kit.oru(kit.uid(), filler=filler, values=[("NM", "SIZE", "1", "2")]))
        [row] = await kit.settled(app, 1)
    assert row.state == "done", row.last_error
    [report] = sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{filler}")
    assert report["status"] == "final" and len(report["result"]) == 1
