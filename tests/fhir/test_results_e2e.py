"""ORU over MLLP -> the engine -> sekmet (a real FHIR server): what arrives, once."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.store.models import Message as StoredMessage

kit = sys.modules["fhir_servers"]  # loaded by conftest.py (tests are not a package)
oru, send, settled, uid = kit.oru, kit.send, kit.settled, kit.uid
Sekmet = Any

FILLER = "urn:oid:1.2.3.4.5.4"
MRN = "urn:oid:1.2.3.4.5.1"
MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]


def ack_code(reply: bytes) -> str:
    return Message.parse(reply).get("MSA-1")


def report_of(sekmet: Sekmet, filler: str) -> list[dict[str, Any]]:
    return sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{filler}")


async def test_final_report_arrives_with_its_fields(sekmet: Sekmet, engine_at: Any) -> None:
    filler = uid()
    msg = oru(uid(), filler=filler, accession="ACC" + filler, placer="PL" + filler,
              values=[("NM", "SIZE", "1", "12.5"), ("CE", "IMPRESSION", "2", "NORMAL^Normal^LOCAL")])
    async with engine_at(sekmet.base_url) as app:
        assert [ack_code(r) for r in await send(app, msg)] == ["AA"]
        rows = await settled(app, 1)
    assert [r.state for r in rows] == ["done"], rows[0].last_error
    [report] = report_of(sekmet, filler)
    assert report["status"] == "final"
    assert {"system": "urn:oid:1.2.3.4.5.11", "value": "ACC" + filler} == {
        k: v for k, v in report["identifier"][1].items() if k != "type"}
    assert report["basedOn"][0]["identifier"]["value"] == "PL" + filler
    assert report["subject"]["identifier"] == {"system": "urn:oid:1.2.3.4.5.1", "value": "100234"}
    assert report["code"]["coding"][0]["code"] == "CTHEAD"
    assert report["category"][0]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0074"
    assert report["effectivePeriod"] == {"start": "2026-11-25T10:05:00+01:00", "end": "2026-11-25T10:15:00+01:00"}
    assert report["issued"] == "2026-11-25T11:55:00+01:00"
    assert report["resultsInterpreter"][0]["display"] == "Dr Meredith Grey"
    [form] = report["presentedForm"]
    assert form["contentType"] == "text/plain; charset=utf-8"
    text = base64.b64decode(form["data"]).decode("utf-8")
    assert text == "CT head without contrast:\n\nNo acute abnormality.\nIMPRESSION:\nNormal study."
    assert report["conclusion"] == "Normal study."
    assert report["conclusionCode"][0]["coding"][0]["code"] == "NORMAL"
    observations = sekmet.search("Observation", identifier=f"{FILLER}|{filler}-SIZE-1")
    assert len(observations) == 1
    assert observations[0]["valueQuantity"]["value"] == 12.5
    assert observations[0]["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    refs = {r["reference"] for r in report["result"]}
    assert len(refs) == 2 and all(r.startswith("Observation/") for r in refs)
    assert f"Observation/{observations[0]['id']}" in refs


async def test_correction_updates_the_same_report_and_observations(sekmet: Sekmet, engine_at: Any) -> None:
    filler = uid()
    final = oru(uid(), filler=filler, values=[("NM", "SIZE", "1", "12.5")])
    corrected = oru(uid(), filler=filler, status="C", issued="20261125130000", values=[("NM", "SIZE", "1", "13.0")],
                    text=["IMPRESSION:", "Small lesion, 13 mm."])
    async with engine_at(sekmet.base_url) as app:
        await send(app, final)
        await settled(app, 1)
        await send(app, corrected)
        rows = await settled(app, 2)
    assert [r.state for r in rows] == ["done", "done"]
    [report] = report_of(sekmet, filler)
    assert report["status"] == "corrected"
    assert report["conclusion"] == "Small lesion, 13 mm."
    obs = sekmet.search("Observation", identifier=f"{FILLER}|{filler}-SIZE-1")
    assert len(obs) == 1 and obs[0]["valueQuantity"]["value"] == 13.0 and obs[0]["status"] == "corrected"
    assert len(sekmet.history("DiagnosticReport", report["id"])) == 2


async def test_late_final_after_correction_is_not_applied(sekmet: Sekmet, engine_at: Any) -> None:
    filler = uid()
    corrected = oru(uid(), filler=filler, status="C", issued="20261125130000", text=["IMPRESSION:", "Corrected."])
    late_final = oru(uid(), filler=filler, status="F", issued="20261125115500", text=["IMPRESSION:", "Original."])
    async with engine_at(sekmet.base_url) as app:
        await send(app, corrected)
        await settled(app, 1)
        await send(app, late_final)
        rows = await settled(app, 2)
    assert [r.state for r in rows] == ["done", "done"]
    assert rows[1].response.startswith("not applied")
    [report] = report_of(sekmet, filler)
    assert report["status"] == "corrected" and report["conclusion"] == "Corrected."


async def test_resend_and_reprocess_make_no_duplicate(sekmet: Sekmet, engine_at: Any) -> None:
    from engine.runtime.replay import replay

    filler = uid()
    msg = oru(uid(), filler=filler, values=[("NM", "SIZE", "1", "9")])
    async with engine_at(sekmet.base_url) as app:
        await send(app, msg)
        await settled(app, 1)
        await send(app, msg)  # resend: same MSH-10, answered from the store, nothing queued again
        rows = await settled(app, 1)
        assert len(rows) == 1
        lines = await replay(app.config, [rows[0].message_id])
        assert "status processed" in lines[0]
        rows = await settled(app, 2)
    assert [r.state for r in rows] == ["done", "done"]
    assert len(report_of(sekmet, filler)) == 1
    assert len(sekmet.search("Observation", identifier=f"{FILLER}|{filler}-SIZE-1")) == 1


async def test_invalid_resource_is_refused_and_nothing_queued(sekmet: Sekmet, engine_at: Any) -> None:
    msg = oru(uid(), filler=uid(), status="F")
    bad = msg.replace(b"CTHEAD^CT Head^LOCAL", b"")  # OBR-4 is required for DiagnosticReport.code
    async with engine_at(sekmet.base_url) as app:
        [reply] = await send(app, bad)
        assert ack_code(reply) == "AE"
        assert await settled(app, 0) == []


PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


async def test_ed_pdf_is_readable_as_pdf_from_the_server(sekmet: Sekmet, engine_at: Any) -> None:
    filler = uid()
    ed = f"OBX|9|ED|PDF^Report PDF^LOCAL|1|^application^pdf^Base64^{base64.b64encode(PDF).decode()}||||||F"
    async with engine_at(sekmet.base_url) as app:
        await send(app, oru(uid(), filler=filler, extra=[ed]))
        [row] = await settled(app, 1)
    assert row.state == "done", row.last_error
    [report] = report_of(sekmet, filler)
    pdf = [f for f in report["presentedForm"] if f["contentType"] == "application/pdf"]
    assert len(pdf) == 1 and base64.b64decode(pdf[0]["data"]) == PDF


async def test_conditional_mode_creates_the_patient_once(sekmet: Sekmet, engine_at: Any) -> None:
    filler, mrn = uid(), "MRN" + uid()
    final = oru(uid(), filler=filler, mrn=mrn, values=[("NM", "SIZE", "1", "4")])
    corrected = oru(uid(), filler=filler, mrn=mrn, status="C", issued="20261125130000",
                    values=[("NM", "SIZE", "1", "5")])
    async with engine_at(sekmet.base_url, EMR_FHIR_MODE="conditional", EMR_PATIENT_MODE="create") as app:
        await send(app, final, corrected)
        rows = await settled(app, 2)
    assert [r.state for r in rows] == ["done", "done"], [r.last_error for r in rows]
    [patient] = sekmet.search("Patient", identifier=f"urn:oid:1.2.3.4.5.1|{mrn}")
    assert patient["name"][0]["family"] == "Doe" and patient["gender"] == "female"
    [report] = report_of(sekmet, filler)
    assert report["subject"]["reference"] == f"Patient/{patient['id']}"
    assert report["status"] == "corrected"
    [obs] = sekmet.search("Observation", identifier=f"{FILLER}|{filler}-SIZE-1")
    assert obs["valueQuantity"]["value"] == 5 and obs["subject"]["reference"] == f"Patient/{patient['id']}"
    assert report["result"] == [{"reference": f"Observation/{obs['id']}"}]


async def test_patient_conditional_the_emr_resolves_its_own_patient(sekmet: Sekmet, engine_at: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """`patient: conditional`: the subject goes as `Patient?identifier=mrn|X`, which the EMR resolves to
    the Patient it holds (transaction mode: the server; conditional mode: the engine asks first);
    a patient the EMR does not know is a dead delivery with the server's answer, not a guess."""
    known, unknown = "MRN" + uid(), "MRN" + uid()
    resp = httpx.post(f"{sekmet.base_url}/Patient", headers={"Content-Type": "application/fhir+json"}, timeout=30,
                      json={"resourceType": "Patient", "identifier": [{"system": MRN, "value": known}]})
    assert resp.status_code == 201, resp.text
    patient_id = resp.json()["id"]
    fillers = {"transaction": uid(), "conditional": uid()}
    lost = uid()
    for mode, filler in fillers.items():
        async with engine_at(sekmet.base_url, EMR_FHIR_MODE=mode, EMR_PATIENT_MODE="conditional") as app:
            await send(app, oru(uid(), filler=filler, mrn=known, values=[("NM", "SIZE", "1", "3")]))
            if mode == "transaction":
                await send(app, oru(uid(), filler=lost, mrn=unknown))
            rows = await settled(app, 2 if mode == "transaction" else 1)
        assert rows[0].state == "done", rows[0].last_error
        [report] = report_of(sekmet, filler)
        assert report["subject"] == {"reference": f"Patient/{patient_id}"}
        [obs] = sekmet.search("Observation", identifier=f"{FILLER}|{filler}-SIZE-1")
        assert obs["subject"] == {"reference": f"Patient/{patient_id}"}
        if mode == "transaction":
            assert rows[1].state == "dead" and rows[1].last_error.startswith("HTTP 4"), rows[1].last_error
            assert "http-404" in caplog.text or "http-4" in caplog.text
            assert unknown not in caplog.text  # the server's text quotes the MRN: stored, never logged
    assert sekmet.search("Patient", identifier=f"{MRN}|{unknown}") == []  # nothing created in that mode
    assert report_of(sekmet, lost) == []


async def test_an_obx_the_report_cannot_use_is_dropped_with_a_warning(sekmet: Sekmet, engine_at: Any) -> None:
    filler, control = uid(), uid()
    msg = oru(control, filler=filler, values=[("NM", "SIZE", "1", "7"), ("DT", "SCANDATE", "1", "20261125")])
    async with engine_at(sekmet.base_url) as app:
        [reply] = await send(app, msg)
        rows = await settled(app, 1)
        with app.db.connect() as conn:
            (stored,) = conn.execute(select(MESSAGES.c.status, MESSAGES.c.warnings)
                                     .where(MESSAGES.c.control_id == control)).all()
    ack = Message.parse(reply)
    assert ack.get("MSA-1") == "AA"
    [err] = ack.segments("ERR")
    assert err.fields[4] == "W" and err.fields[2].startswith("OBX^"), ack.text  # ERR-4 W, ERR-2 OBX-2
    [warning] = json.loads(stored.warnings)
    assert warning["location"] == "OBX-2" and "obx_value_types" in warning["text"]
    assert "20261125" not in stored.warnings  # names the field, not the value
    assert stored.status == "processed" and rows[0].state == "done", rows[0].last_error
    [report] = report_of(sekmet, filler)
    assert len(report["result"]) == 1  # the NM; the DT line made no Observation
    assert sekmet.search("Observation", identifier=f"{FILLER}|{filler}-SCANDATE-1") == []
