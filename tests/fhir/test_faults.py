"""The EMR on a bad day (a fault-injecting proxy in front of sekmet), and refused credentials."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

from engine.hl7.er7 import Message

kit = sys.modules["fhir_servers"]  # loaded by conftest.py (tests are not a package)
oru, send, settled, uid = kit.oru, kit.send, kit.settled, kit.uid

FILLER = "urn:oid:1.2.3.4.5.4"


async def test_emr_down_then_delivered_in_order(sekmet: Any, engine_at: Any) -> None:
    proxy = kit.FaultProxy(sekmet.base_url.removesuffix("/fhir"), faults=["503", "stall", "reset"], stall_seconds=6)
    await proxy.start()
    filler = uid()
    final = oru(uid(), filler=filler, values=[("NM", "SIZE", "1", "10")])
    corrected = oru(uid(), filler=filler, status="C", issued="20261125130000", values=[("NM", "SIZE", "1", "11")])
    try:
        async with engine_at(proxy.base_url, EMR_FHIR_TIMEOUT="3") as app:
            replies = await send(app, final, corrected)
            assert [Message.parse(r).get("MSA-1") for r in replies] == ["AA", "AA"]  # durable, before the EMR is
            rows = await settled(app, 2)
    finally:
        await proxy.stop()
    assert [r.state for r in rows] == ["done", "done"], [r.last_error for r in rows]
    assert rows[0].attempts >= 4  # 503, stall, reset, then through
    assert [f for _, _, f in proxy.requests[:3]] == ["503", "stall", "reset"]
    [report] = sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{filler}")
    assert report["status"] == "corrected"  # the correction waited for its final (same patient)
    assert [v["status"] for v in sekmet.history("DiagnosticReport", report["id"])] == ["corrected", "final"]
    [obs] = sekmet.search("Observation", identifier=f"{FILLER}|{filler}-SIZE-1")
    assert obs["valueQuantity"]["value"] == 11


async def test_400_goes_dead_with_the_operation_outcome(sekmet: Any, engine_at: Any) -> None:
    proxy = kit.FaultProxy(sekmet.base_url.removesuffix("/fhir"), faults=[None, "400"])
    await proxy.start()
    filler = uid()
    try:
        async with engine_at(proxy.base_url) as app:
            await send(app, oru(uid(), filler=filler))
            [row] = await settled(app, 1)
    finally:
        await proxy.stop()
    assert row.state == "dead" and row.attempts == 1
    assert row.last_error.startswith("HTTP 400")
    assert json.loads(row.response)["resourceType"] == "OperationOutcome"
    assert sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{filler}") == []


async def test_bad_token_is_dead_with_the_outcome_good_token_delivers(sekmet_with_auth: Any, engine_at: Any) -> None:
    server = sekmet_with_auth
    bad, good = uid(), uid()
    async with engine_at(server.base_url, EMR_FHIR_AUTH="bearer", EMR_FHIR_TOKEN="wrong-" + kit.TOKEN) as app:
        await send(app, oru(uid(), filler=bad))
        [row] = await settled(app, 1)
    assert row.state == "dead" and row.attempts == 1
    assert row.last_error.startswith("HTTP 401")
    assert json.loads(row.response)["resourceType"] == "OperationOutcome"
    assert kit.TOKEN not in row.last_error + row.response
    async with engine_at(server.base_url, EMR_FHIR_AUTH="bearer", EMR_FHIR_TOKEN=kit.TOKEN) as app:
        await send(app, oru(uid(), filler=good))
        rows = await settled(app, 2)
    assert rows[-1].state == "done", rows[-1].last_error
    assert len(server.search("DiagnosticReport", identifier=f"{FILLER}|{good}")) == 1
    assert server.search("DiagnosticReport", identifier=f"{FILLER}|{bad}") == []


async def test_oauth2_client_credentials_token_is_cached(sekmet_with_auth: Any, engine_at: Any,
                                                         tmp_path: Any) -> None:
    server = sekmet_with_auth
    tokens = kit.TokenServer("engine", "s3cret-" + uid(), kit.TOKEN)
    await tokens.start()
    channels = tmp_path / "channels"
    channels.mkdir()
    text = (kit.ROOT / "channels" / "ris-results.yaml").read_text()
    text = text.replace("      token: ${EMR_FHIR_TOKEN:-}",
                        f"      token_url: {tokens.url}\n      client_id: engine\n"
                        "      client_secret: ${EMR_FHIR_CLIENT_SECRET}")
    (channels / "ris-results.yaml").write_text(text)
    fillers = [uid(), uid()]
    try:
        async with engine_at(server.base_url, channels=channels, EMR_FHIR_AUTH="oauth2",
                             EMR_FHIR_CLIENT_SECRET=tokens.client_secret) as app:
            await send(app, *(oru(uid(), filler=f) for f in fillers))
            rows = await settled(app, 2)
    finally:
        await tokens.stop()
    assert [r.state for r in rows] == ["done", "done"], [r.last_error for r in rows]
    assert tokens.requests == 1
    for f in fillers:
        assert len(server.search("DiagnosticReport", identifier=f"{FILLER}|{f}")) == 1
    assert all(tokens.client_secret not in r.last_error + r.response for r in rows)


async def test_412_on_multiple_matches_goes_dead_with_the_operation_outcome(sekmet: Any, engine_at: Any) -> None:
    def multiple_matches(method: str, path: str) -> str | None:
        return "412" if method == "POST" else None  # the transaction: its conditional update matched two

    proxy = kit.FaultProxy(sekmet.base_url.removesuffix("/fhir"), fault_when=multiple_matches)
    await proxy.start()
    filler = uid()
    try:
        async with engine_at(proxy.base_url) as app:
            await send(app, oru(uid(), filler=filler))
            [row] = await settled(app, 1)
    finally:
        await proxy.stop()
    assert row.state == "dead" and row.attempts == 1  # not retried: a second try would match two again
    assert row.last_error.startswith("HTTP 412") and "matched 2 resources" in row.last_error
    outcome = json.loads(row.response)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "multiple-matches"
    assert sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{filler}") == []


async def test_two_reports_with_one_identifier_on_the_server_are_not_guessed_between(sekmet: Any,
                                                                                   engine_at: Any) -> None:
    filler = uid()
    for _ in range(2):  # someone else created the same report twice (a plain create each)
        resp = httpx.post(f"{sekmet.base_url}/DiagnosticReport", headers={"Content-Type": "application/fhir+json"},
                          json={"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "CT"},
                                "identifier": [{"system": FILLER, "value": filler}]}, timeout=30)
        assert resp.status_code == 201, resp.text
    async with engine_at(sekmet.base_url) as app:
        await send(app, oru(uid(), filler=filler))
        [row] = await settled(app, 1)
    assert row.state == "dead" and row.last_error.startswith("HTTP 412"), row.last_error
    assert json.loads(row.response)["resourceType"] == "OperationOutcome"
    reports = sekmet.search("DiagnosticReport", identifier=f"{FILLER}|{filler}")
    assert [r["status"] for r in reports] == ["preliminary", "preliminary"]  # neither overwritten


async def test_basic_auth_delivers_and_a_wrong_password_is_dead(sekmet_with_basic: Any, engine_at: Any,
                                                                tmp_path: Any) -> None:
    server = sekmet_with_basic
    channels = tmp_path / "channels"
    channels.mkdir()
    text = (kit.ROOT / "channels" / "ris-results.yaml").read_text()
    text = text.replace("      token: ${EMR_FHIR_TOKEN:-}",
                        "      username: engine\n      password: ${EMR_FHIR_PASSWORD}")
    (channels / "ris-results.yaml").write_text(text)
    good, bad = uid(), uid()
    async with engine_at(server.base_url, channels=channels, EMR_FHIR_AUTH="basic",
                         EMR_FHIR_PASSWORD="wrong-" + kit.PASSWORD) as app:
        await send(app, oru(uid(), filler=bad))
        [row] = await settled(app, 1)
    assert row.state == "dead" and row.last_error.startswith("HTTP 401"), row.last_error
    assert kit.PASSWORD not in row.last_error + row.response
    async with engine_at(server.base_url, channels=channels, EMR_FHIR_AUTH="basic",
                         EMR_FHIR_PASSWORD=kit.PASSWORD) as app:
        await send(app, oru(uid(), filler=good))
        rows = await settled(app, 2)
    assert rows[-1].state == "done", rows[-1].last_error
    assert len(server.search("DiagnosticReport", identifier=f"{FILLER}|{good}")) == 1
    assert server.search("DiagnosticReport", identifier=f"{FILLER}|{bad}") == []
