"""The medication list through the real stack: resources POSTed over HTTP to a running engine,
the List read back over HTTP (bearer token required), the CLI on the same store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from engine.cli import app as cli_app
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from tests.medrec.helpers import AMLODIPINE_5, ATORVA_10, LIPITOR_10, RXNORM, administration, bundle, dispense, request

pytest.importorskip("engine.runtime.http_app", reason="the HTTP listener (issue 14 part 1) is not on this branch")

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "medrec-test-token"
FHIR = {"Content-Type": "application/fhir+json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHANNEL = f"""\
name: meds
source: {{type: http}}
input: fhir
accept: [MedicationRequest, MedicationDispense, MedicationAdministration, MedicationStatement, Medication, Bundle]
destinations:
  - {{name: records, type: medrec, table: {ROOT / 'mappings' / 'tables' / 'medication_groups.csv'}}}
"""


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "meds.yaml").write_text(CHANNEL)
    (tmp_path / "engine.yaml").write_text(
        f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\ndicom:\n  enabled: false\n"
        f"http:\n  enabled: true\n  host: 127.0.0.1\n  port: 0\n  token: {TOKEN}\n"
    )
    return tmp_path / "engine.yaml"


def ago(days: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=days)).isoformat()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[EngineApp, httpx.AsyncClient, Path]]:
    reg = default_registry()
    config = write_config(tmp_path)
    app = EngineApp(load_config(config, reg, env={}), reg)
    await app.start()
    assert app.http is not None
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=60)
    try:
        yield app, client, config
    finally:
        await client.aclose()
        await app.stop()


async def post(client: httpx.AsyncClient, resource: dict[str, Any]) -> httpx.Response:
    return await client.post("/fhir/meds", content=json.dumps(resource), headers={**FHIR, **AUTH})


async def the_list(client: httpx.AsyncClient, path: str = "/fhir/meds/List?patient=p1") -> dict[str, Any]:
    response = await client.get(path, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    return body


def statements(lst: dict[str, Any]) -> list[dict[str, Any]]:
    return list(lst.get("contained") or [])


async def test_posted_bundle_becomes_one_list_and_changes_recompute_it(engine: Any) -> None:
    _app, client, _ = engine
    medication = {"resourceType": "Medication", "id": "lipitor", "code": {
        "coding": [{"system": RXNORM, "code": LIPITOR_10, "display": "Lipitor 10 MG Oral Tablet"}]}}
    by_ref = dispense("d-brand", ago(3), code=None, medicationReference={"reference": "Medication/lipitor"})
    b = bundle(medication, request("r1", "completed", ago(30)), dispense("d1", ago(20)), by_ref,
               request("r2", "active", ago(400), code=AMLODIPINE_5),
               dispense("gone", ago(2), status="entered-in-error"),
               administration("a-old", ago(101), code=AMLODIPINE_5))
    response = await post(client, b)
    assert response.status_code in (200, 201), response.text

    lst = await the_list(client)
    assert lst["resourceType"] == "List" and lst["code"]["coding"][0]["code"] == "10160-0"
    assert (lst["mode"], lst["status"], lst["subject"]) == ("working", "current", {"reference": "Patient/p1"})
    assert len(statements(lst)) == 2  # atorvastatin (generic and brand, via the table) and amlodipine
    atorva = next(s for s in statements(lst) if any(c["code"] == ATORVA_10 for c in
                                                    s["medicationCodeableConcept"]["coding"]))
    assert [d["reference"] for d in atorva["derivedFrom"]] == [
        "MedicationDispense/d-brand", "MedicationDispense/d1", "MedicationRequest/r1"]
    assert atorva["effectiveDateTime"] == ago(3)
    amlo = next(s for s in statements(lst) if s is not atorva)
    assert [d["reference"] for d in amlo["derivedFrom"]] == ["MedicationRequest/r2"]  # the old administration is out
    assert amlo["status"] == "active"

    same = await the_list(client, "/fhir/meds/Patient/p1/$medication-list")
    assert statements(same) == statements(lst)

    # the active request is stopped (PUT of a new version): its record is recomputed in that unit
    stopped = request("r2", "stopped", ago(400), code=AMLODIPINE_5)
    response = await client.put("/fhir/meds/MedicationRequest/r2", content=json.dumps(stopped),
                                headers={**FHIR, **AUTH})
    assert response.status_code in (200, 201), response.text
    after = await the_list(client)
    assert len(statements(after)) == 1
    assert statements(after)[0]["derivedFrom"] == atorva["derivedFrom"]

    # as-of: the list from what had been received by the end of that day
    today = await the_list(client, f"/fhir/meds/List?patient=Patient/p1&as-of={ago(0)}")
    assert [s["derivedFrom"] for s in statements(today)] == [atorva["derivedFrom"]]
    yesterday = await the_list(client, f"/fhir/meds/List?patient=Patient/p1&as-of={ago(1)}")
    assert "emptyReason" in yesterday  # nothing had arrived yet


async def test_unknown_patient_is_accepted_and_empty_list_says_so(engine: Any) -> None:
    _app, client, _ = engine
    empty = await the_list(client, "/fhir/meds/List?patient=nobody")
    assert empty["emptyReason"]["coding"][0]["code"] == "nilknown" and "entry" not in empty
    unknown = request("u1", "active", ago(1))
    unknown["subject"] = {"reference": "urn:uuid:7d1c1c52-0000-4000-8000-000000000001"}
    assert (await post(client, unknown)).status_code in (200, 201)
    lst = await the_list(client, "/fhir/meds/List?patient=urn:uuid:7d1c1c52-0000-4000-8000-000000000001")
    assert len(statements(lst)) == 1
    # no code, no reference, no text (medication[x] is required, so the EMR says why it is absent)
    nothing = request("n1", "active", ago(1), code=None, medicationCodeableConcept={"extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]})
    assert (await post(client, nothing)).status_code in (200, 201)
    lst = await the_list(client)
    assert statements(lst)[0]["medicationCodeableConcept"]["text"].startswith("medication not stated")


async def test_bad_input_answers_name_the_element(engine: Any) -> None:
    _app, client, _ = engine
    bad = dispense("bad", "2026-02-30T10:00:00Z")
    response = await post(client, bad)
    assert response.status_code in (400, 422)
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "whenHandedOver" in outcome["issue"][0]["expression"][0]
    no_patient = request("np", "active", ago(1))
    del no_patient["subject"]
    response = await post(client, no_patient)
    assert response.status_code in (400, 422) and "subject" in response.json()["issue"][0]["expression"][0]
    # refused by the destination's prepare step, before the writer: still stored as received, as an error
    with _app.db.connect() as conn:
        row = conn.execute(text("SELECT status, error_location, raw FROM messages WHERE control_id LIKE "
                                "'MedicationRequest/np#%'")).one()
    assert row[0] == "error" and "subject" in row[1] and json.loads(row[2])["id"] == "np"
    response = await client.get("/fhir/meds/List", headers=AUTH)
    assert response.status_code == 400 and response.json()["issue"][0]["expression"] == ["patient"]
    response = await client.get("/fhir/meds/List?patient=p1&as-of=yesterday", headers=AUTH)
    assert response.status_code == 400 and response.json()["issue"][0]["expression"] == ["as-of"]


async def test_no_token_no_list(engine: Any) -> None:
    _app, client, _ = engine
    for path in ("/fhir/meds/List?patient=p1", "/fhir/meds/Patient/p1/$medication-list"):
        response = await client.get(path)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].lower().startswith("bearer")
        wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    response = await client.post("/fhir/meds", content=json.dumps(request("x", "active", ago(1))), headers=FHIR)
    assert response.status_code == 401


async def test_cli_prints_the_list_and_explains(engine: Any) -> None:
    app, client, config = engine
    b = bundle(request("r1", "completed", ago(30)), dispense("d1", ago(20)), dispense("old", ago(150)))
    assert (await post(client, b)).status_code in (200, 201)
    runner = CliRunner()
    env = {"ENGINE_CONFIG": None}
    result = runner.invoke(cli_app, ["medrec", "p1", "--json", "--explain", "-c", str(config)], env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["date"] for r in out["records"]] == [ago(20)]
    assert [s["id"] for s in out["records"][0]["sources"]] == ["d1", "r1"]
    assert [(e["id"], "before the 100-day window" in e["reason"]) for e in out["excluded"]] == [("old", True)]
    table = runner.invoke(cli_app, ["medrec", "Patient/p1", "--explain", "-c", str(config)], env=env)
    assert table.exit_code == 0, table.output
    assert "Dispense d1" in table.stdout and "MedicationDispense/old" in table.stdout
    then = runner.invoke(cli_app, ["medrec", "p1", "--as-of", ago(400), "--json", "-c", str(config)], env=env)
    assert then.exit_code == 0 and json.loads(then.stdout)["records"] == []


def shipped_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_API_TOKEN", "BIND_HOST", "ENGINE_STORAGE_URL")}
    env.update({
        "ENGINE_STORAGE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
        "ORDERS_MLLP_PORT": "0", "RESULTS_MLLP_PORT": "0", "DICOM_PORT": "0", "HTTP_PORT": "0",
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"), "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "MEDS_ARCHIVE_DIR": str(tmp_path / "meds"), "ENGINE_LOG_LEVEL": "WARNING", "ENGINE_API_TOKEN": TOKEN,
    })
    env.update(extra)
    return env


async def test_shipped_channel_serves_the_list(tmp_path: Path) -> None:
    reg = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", reg, env=shipped_env(tmp_path)), reg)
    await app.start()
    try:
        assert app.http is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=60) as client:
            b = bundle(request("r1", "completed", ago(30)), dispense("d1", ago(20)), dispense("d0", ago(101)))
            posted = await client.post("/fhir/emr-medications", content=json.dumps(b), headers={**FHIR, **AUTH})
            assert posted.status_code in (200, 201), posted.text
            refused = await client.get("/fhir/emr-medications/List?patient=p1")
            assert refused.status_code == 401
            lst = (await client.get("/fhir/emr-medications/List?patient=p1", headers=AUTH)).json()
            (only,) = statements(lst)
            assert only["effectiveDateTime"] == ago(20)
            assert [d["reference"] for d in only["derivedFrom"]] == ["MedicationDispense/d1", "MedicationRequest/r1"]
    finally:
        await app.stop()


def test_shipped_poll_channel_feeds_the_same_lists(tmp_path: Path) -> None:
    loaded = load_config(ROOT / "engine.yaml", default_registry(), env=shipped_env(tmp_path))
    by_channel = {spec.config.name: {d.name: d for d in spec.destinations} for spec in loaded.channels}
    assert by_channel["emr-medications-poll"]["records"].list_name == "emr-medications"  # type: ignore[attr-defined]
    pushed = by_channel["emr-medications"]["records"]
    polled = by_channel["emr-medications-poll"]["records"]
    same = ("window_days", "timezone", "hierarchy", "systems", "table", "text_merge", "fallbacks")
    assert {k: getattr(pushed, k) for k in same} == {k: getattr(polled, k) for k in same}


def test_bad_medrec_settings_are_config_errors_citing_the_file(tmp_path: Path) -> None:
    from engine.configfile import ConfigError

    config = write_config(tmp_path)
    (tmp_path / "channels" / "meds.yaml").write_text(CHANNEL.replace(
        "type: medrec,", "type: medrec, timezone: Mars/Olympus, hierarchy: [MedicationDispense, MedicationDispense],"))
    with pytest.raises(ConfigError) as info:
        load_config(config, default_registry(), env={})
    problems = [str(p) for p in info.value.problems]
    assert any(p.startswith("channels/meds.yaml:") and "unknown time zone" in p for p in problems), problems
    assert any("appears twice in the hierarchy" in p for p in problems), problems
    (tmp_path / "channels" / "meds.yaml").write_text(CHANNEL.replace(
        str(ROOT / "mappings" / "tables" / "medication_groups.csv"), "mappings/tables/nope.csv"))
    with pytest.raises(ConfigError) as info:
        load_config(config, default_registry(), env={})
    assert [str(p) for p in info.value.problems] == [
        "channels/meds.yaml:6:5 destinations.0: table: cannot read table nope.csv: No such file or directory"]


class CapturingEMR:
    """A minimal FHIR endpoint on a real socket that records each transaction it is sent and
    answers 200 (sekmet, the test EMR, has no List?identifier search for the conditional update)."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                body = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": [
                    {"response": {"status": "200 OK", "location": "List/1/_history/1"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_changed_lists_are_pushed_to_the_emr(tmp_path: Path) -> None:
    import asyncio

    emr = CapturingEMR()
    try:
        channel = CHANNEL.replace("type: medrec,", "type: medrec, push: emr,") + (
            f"  - {{name: emr, type: fhir, base_url: '{emr.base_url}'}}\n")
        config = write_config(tmp_path)
        (tmp_path / "channels" / "meds.yaml").write_text(channel)
        (tmp_path / "engine.yaml").write_text((tmp_path / "engine.yaml").read_text()
                                              + "delivery:\n  poll_interval_seconds: 0.05\n")
        reg = default_registry()
        app = EngineApp(load_config(config, reg, env={}), reg)
        await app.start()

        async def pushed(n: int) -> list[dict[str, Any]]:
            for _ in range(600):
                if len(emr.received) >= n:
                    break
                await asyncio.sleep(0.05)
            return [e["resource"] for bundle in emr.received for e in bundle["entry"]]

        try:
            assert app.http is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=60) as client:
                b = bundle(request("r1", "completed", ago(30)), dispense("d1", ago(20)))
                assert (await post(client, b)).status_code in (200, 201)
                (first,) = await pushed(1)
                entry = emr.received[0]["entry"][0]
                assert entry["request"]["method"] == "PUT"
                ident = "urn%3Ax-engine%3Amedication-list%7Cmeds%3APatient%2Fp1"  # conditional update by identifier
                assert entry["request"]["url"] == f"List?identifier={ident}"
                assert first["code"]["coding"][0]["code"] == "10160-0"
                assert [d["reference"] for d in first["contained"][0]["derivedFrom"]] == [
                    "MedicationDispense/d1", "MedicationRequest/r1"]
                # a resource that leaves the list as it was (a dispense outside the window) pushes nothing;
                # a request entered in error changes it: pushed again
                old = dispense("old", ago(300))
                assert (await post(client, old)).status_code in (200, 201)
                stopped = request("r1", "entered-in-error", ago(30))
                assert (await post(client, stopped)).status_code in (200, 201)
                lists = await pushed(2)
                assert len(lists) == 2
                assert lists[1]["contained"][0]["derivedFrom"] == [{"reference": "MedicationDispense/d1"}]
        finally:
            await app.stop()
    finally:
        emr.stop()
