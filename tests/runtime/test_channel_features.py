"""Channel options end to end: filter, structure validation, enhanced ACK mode, MLLP release 2
commit bytes, charset override, and the MLLP destination's reading of the receiver's ACK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.hl7.ack import build_ack
from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient, start_server
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store.models import Delivery
from engine.store.models import Message as StoredMessage

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
MESSAGES = StoredMessage.__table__
DELIVERIES = Delivery.__table__


def oru(control_id: str, extra_msh: str = "") -> bytes:
    body = (SAMPLES / "oru_r01.hl7").read_bytes().replace(b"|ORU0001|", f"|{control_id}|".encode())
    if extra_msh:
        first, rest = body.split(b"\r", 1)
        body = first + extra_msh.encode() + b"\r" + rest
    return body


async def start(tmp_path: Path, channel_yaml: str) -> EngineApp:
    (tmp_path / "channels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "engine.yaml").write_text(
        f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\ndicom:\n  enabled: false\n"
        "delivery:\n  max_attempts: 3\n  backoff_base_seconds: 0.05\n  backoff_cap_seconds: 0.1\n"
        "  poll_interval_seconds: 0.05\n"
    )
    (tmp_path / "channels" / "c.yaml").write_text(channel_yaml)
    registry = default_registry()
    app = EngineApp(load_config(tmp_path / "engine.yaml", registry, env={}), registry)
    await app.start()
    return app


@pytest.fixture
async def stop_after() -> AsyncIterator[list[EngineApp]]:
    apps: list[EngineApp] = []
    yield apps
    for app in apps:
        await app.stop()


async def exchange(app: EngineApp, body: bytes) -> bytes:
    async with MLLPClient("127.0.0.1", app.port_of("c"), read_timeout=20) as client:
        return await client.send(body)


def statuses(app: EngineApp) -> dict[str, str]:
    with app.db.connect() as conn:
        return {r.control_id: r.status for r in conn.execute(select(MESSAGES.c.control_id, MESSAGES.c.status))}


async def test_filter_stores_as_filtered_and_acks_aa(tmp_path: Path, stop_after) -> None:
    app = await start(tmp_path, """\
name: c
source: {type: mllp, port: 0}
filter:
  when: ["OBR-25 == 'F'"]
""")
    stop_after.append(app)
    assert b"MSA|AA|F-1" in await exchange(app, oru("F-1"))
    prelim = oru("F-2").replace(b"|CT|F|", b"|CT|P|")
    assert b"MSA|AA|F-2" in await exchange(app, prelim)
    assert statuses(app) == {"F-1": "processed", "F-2": "filtered"}


async def test_structure_validation_turns_problems_into_err(tmp_path: Path, stop_after) -> None:
    app = await start(tmp_path, "name: c\nsource: {type: mllp, port: 0}\ninput: {type: hl7v2, validate: true}\n")
    stop_after.append(app)
    assert b"MSA|AA|V-1" in await exchange(app, oru("V-1"))
    # an OBX moved up before PV1 and the order: a segment sequence error
    lines = oru("V-2").split(b"\r")
    assert lines[5].startswith(b"OBX")
    reordered = b"\r".join([lines[0], lines[1], lines[5], *lines[2:5], *lines[6:]])
    reply = Message.parse(await exchange(app, reordered))
    assert reply.get("MSA-1") in ("AE", "AR")
    assert reply.get("ERR-3.1") in ("100", "101", "102", "200")
    assert statuses(app)["V-2"] == "error"


async def test_enhanced_mode_commit_acks(tmp_path: Path, stop_after) -> None:
    app = await start(tmp_path, "name: c\nsource: {type: mllp, port: 0}\naccept: [ORU^R01]\n")
    stop_after.append(app)
    # MSH-15 = AL, MSH-16 = NE: a commit ACK
    body = oru("E-1").replace(b"|P|2.5.1", b"|P|2.5.1|||AL|NE")
    assert Message.parse(await exchange(app, body)).get("MSA-1") == "CA"
    # MSH-15 = NE, MSH-16 = AL: the application ACK on the same connection
    body = oru("E-2").replace(b"|P|2.5.1", b"|P|2.5.1|||NE|AL")
    assert Message.parse(await exchange(app, body)).get("MSA-1") == "AA"
    # a rejected type in enhanced mode is CR
    adt = (SAMPLES / "adt_a08.hl7").read_bytes()
    first, rest = adt.split(b"\r", 1)
    fields = first.split(b"|")
    fields += [b""] * (16 - len(fields))
    fields[14], fields[15] = b"AL", b"AL"
    reply = Message.parse(await exchange(app, b"|".join(fields) + b"\r" + rest))
    assert reply.get("MSA-1") == "CR" and reply.get("ERR-3.1") == "200"


async def test_mllp_release_2_commit_bytes(tmp_path: Path, stop_after) -> None:
    app = await start(tmp_path, "name: c\nsource: {type: mllp, port: 0, commit_ack: true}\naccept: [ORU^R01]\n")
    stop_after.append(app)
    assert await exchange(app, oru("R2-1")) == b"\x06"
    assert await exchange(app, (SAMPLES / "adt_a08.hl7").read_bytes()) == b"\x15"


async def test_charset_override_wins_over_msh18(tmp_path: Path, stop_after) -> None:
    body = oru("CS-1").replace(b"Doe^Jane", "Müller^Jürgen".encode("latin-1")).replace(
        b"|P|2.5.1", b"|P|2.5.1||||||UNICODE UTF-8")  # declared UTF-8 (MSH-18), sent as Latin-1
    plain = await start(tmp_path / "plain", "name: c\nsource: {type: mllp, port: 0}\n")
    stop_after.append(plain)
    refused = Message.parse(await exchange(plain, body))
    assert refused.get("MSA-1") == "AE" and refused.get("ERR-3.1") == "102"  # not valid UTF-8
    channel = "name: c\nsource: {type: mllp, port: 0}\ninput: {type: hl7v2, charset: 8859/1}\n"
    fixed = await start(tmp_path / "fixed", channel)
    stop_after.append(fixed)
    assert b"MSA|AA|CS-1" in await exchange(fixed, body)
    assert statuses(fixed) == {"CS-1": "processed"}


async def test_mllp_destination_reads_the_receivers_ack(tmp_path: Path, stop_after) -> None:
    received: list[str] = []

    async def receiver(body: bytes, _conn: object) -> bytes:
        msg = Message.parse(body)
        received.append(msg.control_id)
        if msg.control_id.startswith("AE"):
            from engine.errors import ProcessingError

            return build_ack(msg, "AE", ProcessingError("patient unknown here", 204, "PID-3")).encode()
        if msg.control_id.startswith("AR") and received.count(msg.control_id) < 2:
            return build_ack(msg, "AR").encode()
        if msg.control_id.startswith("WRONG"):
            return build_ack(msg, "AA").replace(msg.control_id, "OTHER").encode()
        return build_ack(msg, "AA").encode()

    server = await start_server(receiver, "127.0.0.1", 0)
    try:
        app = await start(tmp_path, f"""\
name: c
source: {{type: mllp, port: 0}}
destinations:
  - name: forward
    type: mllp
    host: 127.0.0.1
    port: {server.port}
    ack_timeout: 5
    order_by: none
""")
        stop_after.append(app)
        for cid in ("OK-1", "AE-1", "AR-1", "WRONG-1"):
            assert b"MSA|AA|" + cid.encode() in await exchange(app, oru(cid))

        def states() -> dict[str, tuple[str, int, str]]:
            with app.db.connect() as conn:
                rows = conn.execute(
                    select(MESSAGES.c.control_id, DELIVERIES.c.state, DELIVERIES.c.attempts, DELIVERIES.c.last_error)
                    .join(DELIVERIES, DELIVERIES.c.message_id == MESSAGES.c.id)
                ).all()
            return {r[0]: (r[1], r[2], r[3]) for r in rows}

        for _ in range(200):
            s = states()
            if all(v[0] in ("done", "dead") for v in s.values()) and len(s) == 4:
                break
            await asyncio.sleep(0.05)
        s = states()
        assert s["OK-1"][0] == "done"
        assert s["AE-1"][0] == "dead" and "patient unknown here" in s["AE-1"][2]  # AE: parked at once
        assert s["AR-1"][0] == "done" and s["AR-1"][1] == 2  # AR: retried, then accepted
        assert s["WRONG-1"][0] == "dead" and "not 'WRONG-1'" in s["WRONG-1"][2]  # MSA-2 mismatch retried to dead
        assert received.count("OK-1") == 1
    finally:
        await server.close()
