"""The FHIR poller against a real FHIR server (sekmet) holding more than one page of results:
window queries on the first run, `_lastUpdated` afterwards, pages followed by Bundle.link[next],
each resource stored and deduped like a posted one, progress in poll_state and /metrics."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store.models import Message
from engine.store.poll_state import load_states

MESSAGES = Message.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _servers() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "fhir" / "fhir_servers.py"
    if "fhir_servers" in sys.modules:
        return sys.modules["fhir_servers"]
    spec = importlib.util.spec_from_file_location("fhir_servers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fhir_servers"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = _servers().Sekmet(tmp_path_factory.mktemp("sekmet"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def request(rid: str, authored: datetime, status: str = "active") -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": rid, "status": status, "intent": "order",
            "subject": {"reference": "Patient/pp1"}, "authoredOn": authored.date().isoformat(),
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "197361"}]}}


def put_all(emr: Any, resources: list[dict[str, Any]]) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]}
    resp = httpx.post(emr.base_url, json=bundle, headers={"Content-Type": "application/fhir+json"}, timeout=120)
    assert resp.status_code == 200, resp.text[:500]


def config(tmp_path: Path, base_url: str, auth: str = "") -> Path:
    (tmp_path / "channels").mkdir(parents=True)
    (tmp_path / "engine.yaml").write_text(
        f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\ndicom:\n  enabled: false\n"
        "http:\n  enabled: true\n  port: 0\n")
    (tmp_path / "channels" / "poll.yaml").write_text(f"""\
name: poll
source:
  type: fhir-poll
  base_url: {base_url}
  {auth or "auth: {type: none}"}
  resources: [MedicationRequest, MedicationStatement]
  patients: [pp1]
  page_size: 25
  interval_seconds: 3600
accept: [MedicationRequest, MedicationStatement]
""")
    return tmp_path / "engine.yaml"


def stored(app: EngineApp) -> list[dict[str, Any]]:
    assert app.db is not None
    with app.db.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(MESSAGES).order_by(MESSAGES.c.id))]


async def test_poller_follows_pages_and_dedupes(emr: Any, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    recent = [request(f"rq{i}", now - timedelta(days=i % 90)) for i in range(40)]
    old_active = request("old-active", now - timedelta(days=400))
    old_done = request("old-done", now - timedelta(days=400), status="completed")
    await asyncio.to_thread(put_all, emr, [{"resourceType": "Patient", "id": "pp1"}, *recent, old_active, old_done])

    reg = default_registry()
    app = EngineApp(load_config(config(tmp_path, emr.base_url), reg, env={}), reg)
    await app.start()
    try:
        assert app.db is not None
        for _ in range(600):  # the first run starts with the engine
            states = await asyncio.to_thread(load_states, app.db, "poll")
            if len(states) == 2:
                break
            await asyncio.sleep(0.1)
        by_type = {s["resource_type"]: s for s in states}
        first = by_type["MedicationRequest"]
        assert first["last_error"] == "" and first["since"] != ""
        assert first["pages"] >= 3  # 40 by authoredon in pages of 25, then status=active
        rows = stored(app)
        ids = {r["control_id"].split("#")[0] for r in rows if r["status"] == "processed"}
        assert ids == {f"MedicationRequest/rq{i}" for i in range(40)} | {"MedicationRequest/old-active"}
        assert "MedicationRequest/old-done" not in ids  # outside the window and not active: never asked for
        assert all(r["patient_id"] == "Patient/pp1" for r in rows)

        source = app.channels["poll"].source
        again = await source.run_once()  # type: ignore[attr-defined]  # the fhir-poll source
        # what changed since the last run (which overlaps it): every resource, whatever its date; those
        # already stored are duplicates, and old-done, changed within the overlap, is new
        assert again["MedicationRequest"] == 1
        new = [r["control_id"].split("#")[0] for r in stored(app)[len(rows):] if r["status"] != "duplicate"]
        assert new == ["MedicationRequest/old-done"]
        assert sum(r["status"] == "duplicate" for r in stored(app)[len(rows):]) == 41

        await asyncio.to_thread(put_all, emr, [request("rq3", now - timedelta(days=3), status="stopped")])
        changed = await source.run_once()  # type: ignore[attr-defined]
        assert changed["MedicationRequest"] == 1
        newest = [r for r in stored(app) if r["status"] == "processed"][-1]
        assert newest["control_id"].startswith("MedicationRequest/rq3#")
        assert b'"stopped"' in newest["raw"]

        assert app.http is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=60) as client:
            metrics = (await client.get("/metrics")).text
        assert 'engine_poll_runs_total{channel="poll",resource="MedicationRequest"} 3' in metrics
        assert 'engine_poll_failing{channel="poll",resource="MedicationRequest"} 0' in metrics
    finally:
        await app.stop()


async def test_poller_failure_keeps_the_watermark(tmp_path: Path) -> None:
    free = _servers().free_port()
    reg = default_registry()
    app = EngineApp(load_config(config(tmp_path, f"http://127.0.0.1:{free}/fhir"), reg, env={}), reg)
    await app.start()
    try:
        assert app.db is not None
        for _ in range(600):
            states = await asyncio.to_thread(load_states, app.db, "poll")
            if len(states) == 2:
                break
            await asyncio.sleep(0.1)
        assert {s["last_error"] for s in states} == {"ConnectError"}
        assert {s["since"] for s in states} == {""} and all(s["last_ok_at"] is None for s in states)
        assert stored(app) == []
    finally:
        await app.stop()


async def test_poller_sends_the_emr_token(tmp_path: Path) -> None:
    servers = _servers()
    emr = servers.Sekmet(tmp_path / "sekmet", tokens=[servers.TOKEN])
    await asyncio.to_thread(emr.start)
    try:
        put = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in [{"resourceType": "Patient", "id": "pp1"}, request("tok1", datetime.now(UTC))]]}
        resp = await asyncio.to_thread(httpx.post, emr.base_url, json=put, timeout=60,
                                       headers={**emr.headers(), "Content-Type": "application/fhir+json"})
        assert resp.status_code == 200, resp.text[:300]
        results = {}
        for name, token in (("wrong", "not-the-token"), ("right", servers.TOKEN)):
            reg = default_registry()
            path = config(tmp_path / name, emr.base_url, auth=f"auth: {{type: bearer, token: {token}}}")
            app = EngineApp(load_config(path, reg, env={}), reg)
            await app.start()
            try:
                assert app.db is not None
                for _ in range(600):
                    states = await asyncio.to_thread(load_states, app.db, "poll")
                    if len(states) == 2:
                        break
                    await asyncio.sleep(0.1)
                results[name] = ({s["last_error"] for s in states},
                                 [r["control_id"] for r in stored(app) if r["status"] == "processed"])
            finally:
                await app.stop()
        assert results["wrong"] == ({"HTTP 401"}, [])
        assert results["right"][0] == {""}
        # found by authoredon and again by status=active: stored once, the second a duplicate
        assert [c.split("#")[0] for c in results["right"][1]] == ["MedicationRequest/tok1"]
    finally:
        await asyncio.to_thread(emr.stop)


def test_poll_configuration_is_checked_at_load() -> None:
    from pydantic import ValidationError

    from engine.runtime.sources.fhir_poll import FhirPollConfig

    base = {"type": "fhir-poll", "base_url": "http://emr.example/fhir"}
    with pytest.raises(ValidationError, match="not a medication resource type: MedicationRequets"):
        FhirPollConfig(**base, resources=["MedicationRequets"])
    with pytest.raises(ValidationError, match="queries.MedicationDispense: not among the polled resources"):
        FhirPollConfig(**base, resources=["MedicationRequest"], queries={"MedicationDispense": ["status=active"]})
    with pytest.raises(ValidationError, match="may use only {start}"):
        FhirPollConfig(**base, queries={"MedicationRequest": ["authoredon=ge{since}"]})


def test_next_pages_are_followed_on_the_emrs_host_only() -> None:
    from engine.runtime.sources.fhir_poll import PollError, _next_link

    def page(url: str) -> dict[str, Any]:
        return {"resourceType": "Bundle", "link": [{"relation": "next", "url": url}]}

    base = "http://emr.example:8090/fhir"
    assert _next_link(page("http://emr.example:8090/fhir?page=2"), base) == "http://emr.example:8090/fhir?page=2"
    assert _next_link(page("/fhir?page=3"), base) == "http://emr.example:8090/fhir?page=3"
    with pytest.raises(PollError, match="another host"):  # the EMR's token would go with it
        _next_link(page("http://elsewhere.example/fhir?page=2"), base)
