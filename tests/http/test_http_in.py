"""FHIR in over HTTP: the engine's one listener on a free port, real sockets, httpx as the EMR."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from engine.store.audit import AUDIT
from engine.store.models import Delivery, Message

MESSAGES = Message.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
FHIR = {"Content-Type": "application/fhir+json"}
Med = Callable[..., dict[str, Any]]


def stored(app: Any) -> list[dict[str, Any]]:
    with app.db.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(MESSAGES).order_by(MESSAGES.c.id))]


async def test_post_is_stored_and_answered_201_with_the_resource(started: Any, med: Med, tmp_path: Path) -> None:
    app, client = await started()
    body = json.dumps(med("mr1")).encode()
    resp = await client.post("/fhir/meds", content=body, headers=FHIR)
    assert resp.status_code == 201, resp.text
    assert resp.json() == json.loads(body)
    assert resp.headers["location"] == "/fhir/meds/MedicationRequest/mr1"
    assert resp.headers["content-type"].startswith("application/fhir+json")
    rows = stored(app)
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "processed" and row["raw"] == body
    assert row["message_type"] == "MedicationRequest" and row["patient_id"] == "Patient/p1"
    assert row["control_id"].startswith("MedicationRequest/mr1#")
    assert "Patient" not in row["ack"] and "amlodipine" not in row["ack"]  # the stored answer holds no content
    for _ in range(200):  # the archive file destination gets the raw resource
        files = list((tmp_path / "archive").glob("*.json"))
        if files:
            break
        await asyncio.sleep(0.05)
    assert [f.read_bytes() for f in files] == [body]


async def test_resend_is_a_duplicate_with_the_same_answer_and_a_change_is_new(started: Any, med: Med) -> None:
    app, client = await started()
    body = json.dumps(med("mr2")).encode()
    first = await client.put("/fhir/meds/MedicationRequest/mr2", content=body, headers=FHIR)
    again = await client.put("/fhir/meds/MedicationRequest/mr2", content=body, headers=FHIR)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    stopped = json.dumps(med("mr2", status="stopped")).encode()
    changed = await client.put("/fhir/meds/MedicationRequest/mr2", content=stopped, headers=FHIR)
    assert changed.status_code == 201 and changed.json()["status"] == "stopped"
    rows = stored(app)
    assert [r["status"] for r in rows] == ["processed", "duplicate", "processed"]
    assert again.headers["x-duplicate-of"] == str(rows[0]["id"])
    assert rows[0]["control_id"] != rows[2]["control_id"]  # same Type/id, another digest: a new unit


async def test_invalid_element_is_422_naming_it_and_stored_as_error(started: Any, med: Med) -> None:
    app, client = await started()
    resp = await client.post("/fhir/meds", json=med("bad", authored="2026-13-45"), headers=FHIR)
    assert resp.status_code == 422
    issue = resp.json()["issue"][0]
    assert resp.json()["resourceType"] == "OperationOutcome"
    assert issue["expression"] == ["MedicationRequest.authoredOn"]
    assert issue["severity"] == "error" and issue["code"] == "value"
    assert "2026-13-45" not in resp.text  # the value is not echoed
    bad_status = await client.post("/fhir/meds", json=med("bad2", status="paused"), headers=FHIR)
    assert bad_status.status_code == 422
    assert bad_status.json()["issue"][0]["expression"] == ["MedicationRequest.status"]
    rows = stored(app)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert rows[0]["error_location"] == "MedicationRequest.authoredOn"


async def test_bad_json_unknown_type_and_media_type(started: Any, med: Med) -> None:
    app, client = await started()
    bad = await client.post("/fhir/meds", content=b'{"resourceType": "Medication', headers=FHIR)
    assert bad.status_code == 400
    assert bad.json()["issue"][0]["code"] == "structure"
    unknown = await client.post("/fhir/meds", json={"resourceType": "Frobnicate", "id": "x"}, headers=FHIR)
    assert unknown.status_code == 400 and unknown.json()["issue"][0]["expression"] == ["resourceType"]
    not_taken = await client.post("/fhir/meds", json={"resourceType": "Patient", "id": "x"}, headers=FHIR)
    assert not_taken.status_code == 422 and not_taken.json()["issue"][0]["code"] == "not-supported"
    xml = await client.post("/fhir/meds", content=b"<MedicationRequest/>", headers={"Content-Type": "text/xml"})
    assert xml.status_code == 415
    rows = stored(app)
    assert [r["status"] for r in rows] == ["error", "error", "error"]  # 415 never reached the channel
    assert rows[0]["raw"] == b'{"resourceType": "Medication'  # stored as received though it did not parse


async def test_unknown_channel_path_mismatch_and_too_large(started: Any, med: Med) -> None:
    app, client = await started()
    resp = await client.post("/fhir/nosuch", json=med(), headers=FHIR)
    assert resp.status_code == 404 and resp.json()["resourceType"] == "OperationOutcome"
    nowhere = await client.get("/nowhere")
    assert nowhere.status_code == 404 and nowhere.json()["issue"][0]["code"] == "not-found"
    wrong_method = await client.delete("/fhir/meds")
    assert wrong_method.status_code == 405 and wrong_method.json()["resourceType"] == "OperationOutcome"
    wrong_type = await client.post("/fhir/meds/MedicationDispense", json=med(), headers=FHIR)
    assert wrong_type.status_code == 400
    assert wrong_type.json()["issue"][0]["expression"] == ["resourceType"]
    wrong_id = await client.put("/fhir/meds/MedicationRequest/other", json=med("mr1"), headers=FHIR)
    assert wrong_id.status_code == 400
    assert wrong_id.json()["issue"][0]["expression"] == ["MedicationRequest.id"]
    # bad input that reached its channel is stored as received, as an error
    mismatches = [(r["message_type"], r["status"], r["error_location"]) for r in stored(app)]
    assert mismatches == [("MedicationRequest", "error", "resourceType"), ("MedicationRequest", "error",
                                                                            "MedicationRequest.id")]
    big = med("big", note=[{"text": "x" * 70000}])
    too_large = await client.post("/fhir/meds", json=big, headers=FHIR)
    assert too_large.status_code == 413

    async def chunks() -> Any:  # no Content-Length: refused while it arrives
        yield b'{"resourceType": "MedicationRequest", "note": [{"text": "'
        for _ in range(200):
            yield b"y" * 1024
        yield b'"}]}'

    streamed = await client.post("/fhir/meds", content=chunks(), headers=FHIR)
    assert streamed.status_code == 413
    assert len(stored(app)) == 2  # an unknown channel, a wrong method or a body too large: nothing to store


async def test_batch_answers_each_entry(started: Any, med: Med) -> None:
    app, client = await started()
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": med("b1", renderedDosageInstruction="x"),  # an R5 element in an R4B resource
         "request": {"method": "PUT", "url": "MedicationRequest/b1"}},
        {"resource": med("b2", authored="yesterday"), "request": {"method": "PUT", "url": "MedicationRequest/b2"}},
        {"resource": med("b3", status="completed"), "request": {"method": "PUT", "url": "MedicationRequest/b3"}},
    ]}
    resp = await client.post("/fhir/meds", json=bundle, headers=FHIR)
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "201 Created"]
    assert answer["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == ["MedicationRequest.authoredOn"]
    assert answer["entry"][0]["response"]["location"] == "MedicationRequest/b1"
    warned = answer["entry"][0]["response"]["outcome"]["issue"]  # an unknown (R5) element: kept, warned
    assert [(i["severity"], i["expression"]) for i in warned] == [
        ("warning", ["MedicationRequest.renderedDosageInstruction"])]
    rows = stored(app)
    assert sorted(r["status"] for r in rows) == ["error", "processed", "processed"]
    first = next(r for r in rows if r["control_id"].startswith("MedicationRequest/b1#"))
    assert json.loads(first["warnings"])[0]["location"] == "MedicationRequest.renderedDosageInstruction"


async def test_transaction_with_one_bad_entry_stores_nothing_as_processed(started: Any, med: Med) -> None:
    app, client = await started()
    entries = [{"resource": med(f"t{i}"), "request": {"method": "PUT", "url": f"MedicationRequest/t{i}"}}
               for i in range(3)]
    entries[2]["resource"]["authoredOn"] = "not a date"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    resp = await client.post("/fhir/meds", json=bundle, headers=FHIR)
    assert resp.status_code == 422
    assert resp.json()["issue"][0]["expression"] == ["Bundle.entry[2].resource.authoredOn"]
    rows = stored(app)
    assert [r["status"] for r in rows] == ["error"] and rows[0]["message_type"] == "Bundle"
    with app.db.connect() as conn:
        assert conn.execute(select(DELIVERIES)).all() == []
    entries[2]["resource"]["authoredOn"] = "2026-11-01"
    ok = await client.post("/fhir/meds", json=bundle, headers=FHIR)
    assert ok.status_code == 200 and ok.json()["type"] == "transaction-response"
    assert [e["response"]["location"] for e in ok.json()["entry"]] == [f"MedicationRequest/t{i}" for i in range(3)]
    rows = stored(app)
    assert [r["status"] for r in rows] == ["error", "processed"]
    assert rows[1]["patient_id"] == "Patient/p1"


async def test_token_required_and_audited(started: Any, med: Med) -> None:
    app, client = await started(token="s3cret-token")
    health = await client.get("/health")  # open: no data, for load balancers
    assert health.status_code == 200
    missing = await client.post("/fhir/meds", json=med(), headers=FHIR)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = await client.post("/fhir/meds", json=med(), headers={**FHIR, "Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    metrics = await client.get("/metrics")
    assert metrics.status_code == 401
    good = await client.post("/fhir/meds", json=med(), headers={**FHIR, "Authorization": "Bearer s3cret-token"})
    assert good.status_code == 201
    assert [r["status"] for r in stored(app)] == ["processed"]  # refused requests never reached the channel
    await app.stop()  # the audit writer flushes what it holds
    with app.db.connect() as conn:
        audit = [dict(r._mapping) for r in conn.execute(select(AUDIT).order_by(AUDIT.c.id))]
    assert [(a["method"], a["path"], a["status"], a["identity"]) for a in audit] == [
        ("POST", "/fhir/meds", 401, "anonymous"),
        ("POST", "/fhir/meds", 401, "anonymous"),
        ("GET", "/metrics", 401, "anonymous"),
        ("POST", "/fhir/meds", 201, audit[3]["identity"]),
    ]
    assert audit[3]["identity"].startswith("token:") and "s3cret" not in audit[3]["identity"]
    assert audit[3]["channel"] == "meds" and audit[3]["message_id"] == stored(app)[0]["id"]
    assert audit[0]["client"].startswith("127.0.0.1:")


async def test_health_and_metrics(started: Any, med: Med) -> None:
    app, client = await started()
    await client.post("/fhir/meds", json=med("m1"), headers=FHIR)
    await client.post("/fhir/meds", json=med("m2", authored="x"), headers=FHIR)
    health = await client.get("/health")
    assert health.json() == {"status": "ok", "channels": ["meds"]}
    for _ in range(200):
        text = (await client.get("/metrics")).text
        if 'engine_queue_depth{channel="meds",destination="archive",state="done"} 1' in text:
            break
        await asyncio.sleep(0.05)
    assert 'engine_messages_total{channel="meds",status="processed"} 1' in text
    assert 'engine_messages_total{channel="meds",status="error"} 1' in text
    assert 'engine_queue_depth{channel="meds",destination="archive",state="done"} 1' in text
    assert 'engine_delivery_latency_seconds_count{channel="meds",destination="archive"} 1' in text
    assert 'engine_http_requests_total{channel="meds",code="201"} 1' in text
    assert "# TYPE engine_delivery_latency_seconds summary" in text


async def test_two_http_channels_share_the_listener(started: Any, med: Med, meds_channel: str) -> None:
    other = meds_channel.replace("name: meds", "name: meds2").replace("directory: archive", "directory: archive2")
    app, client = await started(channels={"meds": meds_channel, "meds2": other})
    one = await client.post("/fhir/meds", json=med("s1"), headers=FHIR)
    two = await client.post("/fhir/meds2", json=med("s1"), headers=FHIR)
    assert one.status_code == two.status_code == 201
    assert sorted(r["channel"] for r in stored(app)) == ["meds", "meds2"]
    assert app.port_of("meds") == app.port_of("meds2") == app.http.port  # type: ignore[union-attr]


async def test_a_body_that_stalls_gets_408(started: Any, med: Med, tmp_path: Path) -> None:
    app, client = await started(extra="  read_timeout: 0.5\n")
    assert app.http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.http.port)
    writer.write(b"POST /fhir/meds HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
                 b"Content-Length: 200\r\n\r\n{\"resourceType\": \"MedicationRequest\", ")
    await writer.drain()  # ... and the rest never comes
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    ok = await client.post("/fhir/meds", json=med("after"), headers=FHIR)  # the listener keeps serving
    assert ok.status_code == 201
    assert [r["status"] for r in stored(app)] == ["processed"]


async def test_post_batch_and_audit_on_both_databases(started: Any, med: Med, db_url: str) -> None:
    app, client = await started(url=db_url, token="pg-token")
    auth = {**FHIR, "Authorization": "Bearer pg-token"}
    one = await client.post("/fhir/meds", json=med("d1"), headers=auth)
    again = await client.post("/fhir/meds", json=med("d1"), headers=auth)
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": med(f"d{i}")} for i in range(2, 6)]}
    many = await client.post("/fhir/meds", json=batch, headers=auth)
    assert one.status_code == again.status_code == 201 and many.status_code == 200
    assert [r["status"] for r in stored(app)] == ["processed", "duplicate"] + ["processed"] * 4
    metrics = (await client.get("/metrics", headers=auth)).text
    assert 'engine_messages_total{channel="meds",status="processed"} 5' in metrics
    await app.stop()
    with app.db.connect() as conn:  # type: ignore[union-attr]
        audit = [dict(r._mapping) for r in conn.execute(select(AUDIT).order_by(AUDIT.c.id))]
    assert [a["status"] for a in audit] == [201, 201, 200, 200]
