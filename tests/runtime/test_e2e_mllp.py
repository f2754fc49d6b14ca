"""The engine over real sockets: good messages, bad input, resends, with our own MLLP client and
with python-hl7's as an independent sender."""

from __future__ import annotations

import asyncio
from pathlib import Path

import hl7
import hl7.mllp
import pytest
from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.store.models import Message as StoredMessage

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
MESSAGES = StoredMessage.__table__


def oru(control_id: str = "ORU0001") -> bytes:
    text = (SAMPLES / "oru_r01.hl7").read_bytes()
    return text.replace(b"|ORU0001|", f"|{control_id}|".encode())


def stored(app, control_id: str) -> list[dict]:
    with app.db.connect() as conn:
        rows = conn.execute(select(MESSAGES).where(MESSAGES.c.control_id == control_id)
                            .order_by(MESSAGES.c.id)).mappings().all()
    return [dict(r) for r in rows]


async def send(app, body: bytes, channel: str = "ris-results") -> Message:
    async with MLLPClient("127.0.0.1", app.port_of(channel), read_timeout=20) as client:
        return Message.parse(await client.send(body))


async def test_result_is_acked_after_commit_and_delivered_to_the_outbox(running_engine, tmp_path: Path) -> None:
    app = running_engine
    ack = await send(app, oru("R-1"))
    assert ack.get("MSA-1") == "AA" and ack.get("MSA-2") == "R-1"
    assert ack.message_type == "ACK^R01"
    assert ack.get("MSH-3") == "ENGINE" and ack.get("MSH-5") == "RIS"  # sender and receiver swapped
    (row,) = stored(app, "R-1")
    assert row["status"] == "processed" and row["raw"] == oru("R-1")
    assert row["ack"].split("\r")[1].startswith("MSA|AA|R-1")
    for _ in range(100):
        files = list((tmp_path / "outbox").glob("*.hl7"))
        if files:
            break
        await asyncio.sleep(0.05)
    assert [f.read_bytes() for f in files] == [oru("R-1")]


async def test_python_hl7_client_as_independent_sender(running_engine) -> None:
    app = running_engine
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", app.port_of("ris-results"))
    try:
        writer.writemessage(hl7.parse(oru("PYHL7-1").decode()))
        await writer.drain()
        reply = await asyncio.wait_for(reader.readmessage(), 20)
    finally:
        writer.close()
    assert str(reply.segment("MSA")[1]) == "AA"
    assert str(reply.segment("MSA")[2]) == "PYHL7-1"


async def test_resend_gets_the_original_ack_and_is_applied_once(running_engine) -> None:
    app = running_engine
    first = await send(app, oru("DUP-1"))
    again = await send(app, oru("DUP-1"))
    assert first.to_er7() == again.to_er7()
    rows = stored(app, "DUP-1")
    assert [r["status"] for r in rows] == ["processed", "duplicate"]
    changed = await send(app, oru("DUP-1").replace(b"No acute", b"An acute"))
    assert changed.get("MSA-1") == "AA"
    assert stored(app, "DUP-1")[-1]["flags"] == "control-id-reused"


async def test_unknown_message_type_is_rejected_with_err(running_engine) -> None:
    app = running_engine
    adt = (SAMPLES / "adt_a08.hl7").read_bytes()
    ack = await send(app, adt)
    assert ack.get("MSA-1") == "AR"
    assert ack.get("ERR-3.1") == "200"
    control_id = Message.parse(adt).control_id
    (row,) = stored(app, control_id)
    assert row["status"] == "error" and row["error_code"] == 200


async def test_missing_control_id_is_an_ae_with_location(running_engine) -> None:
    app = running_engine
    body = oru("X").replace(b"|X|", b"||")
    ack = await send(app, body)
    assert ack.get("MSA-1") == "AE"
    assert ack.get("ERR-3.1") == "101"
    assert ack.get("ERR-2.1") == "MSH"


@pytest.mark.parametrize("garbage", [
    b"\x00\x01 random bytes \xff\xfe",
    b"PID|1||123^^^HOSP^MR||DOE^JOHN\rOBR|1\r",
])
async def test_unreadable_frames_are_stored_as_errors_and_answered(running_engine, garbage: bytes) -> None:
    app = running_engine
    async with MLLPClient("127.0.0.1", app.port_of("ris-results"), read_timeout=20) as client:
        reply = await client.send(garbage)
        assert b"MSA|AR" in reply or b"MSA|AE" in reply
        assert b"ERR|" in reply
        ok = Message.parse(await client.send(oru("AFTER-GARBAGE")))  # the same connection keeps working
    assert ok.get("MSA-1") == "AA"
    with app.db.connect() as conn:
        raws = [r[0] for r in conn.execute(select(MESSAGES.c.raw).where(MESSAGES.c.status == "error"))]
    assert garbage in raws


async def test_bad_encoding_characters_get_a_nak(running_engine) -> None:
    app = running_engine
    body = oru("ENC-1").replace(b"MSH|^~\\&|", b"MSH|^^\\&|", 1)
    async with MLLPClient("127.0.0.1", app.port_of("ris-results"), read_timeout=20) as client:
        reply = await client.send(body)
    assert b"MSA|AR|ENC-1" in reply or b"MSA|AE|ENC-1" in reply
    with app.db.connect() as conn:
        assert conn.execute(select(MESSAGES.c.status).where(MESSAGES.c.raw == body)).scalar_one() == "error"


async def test_truncated_frame_then_good_frame(running_engine) -> None:
    app = running_engine
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port_of("ris-results"))
    try:
        writer.write(b"\x0b" + oru("TRUNC-1")[:60])  # starts a frame, never ends it
        writer.write(b"\x0b" + oru("TRUNC-2") + b"\x1c\x0d")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(b"\x1c\x0d"), 20)
    finally:
        writer.close()
    assert b"MSA|AA|TRUNC-2" in reply


async def test_oversize_frame_and_silent_client_do_not_disturb_others(running_engine) -> None:
    app = running_engine
    port = app.port_of("ris-results")
    silent = await asyncio.open_connection("127.0.0.1", port)  # connects, sends nothing
    big_reader, big_writer = await asyncio.open_connection("127.0.0.1", port)
    big_writer.write(b"\x0b" + b"A" * (17 * 2**20))
    ack = await send(app, oru("NEIGHBOUR-1"))
    assert ack.get("MSA-1") == "AA"
    try:  # the oversize connection was closed (reset, as unread data was pending)
        assert await asyncio.wait_for(big_reader.read(), 20) == b""
    except ConnectionResetError:
        pass
    big_writer.close()
    silent[1].close()


async def test_sender_that_leaves_before_its_ack_loses_nothing(running_engine) -> None:
    app = running_engine
    _, writer = await asyncio.open_connection("127.0.0.1", app.port_of("ris-results"))
    writer.write(b"\x0b" + oru("LEFT-1") + b"\x1c\x0d")
    await writer.drain()
    writer.close()
    ack = await send(app, oru("LEFT-2"))
    assert ack.get("MSA-1") == "AA"
    for _ in range(100):
        if stored(app, "LEFT-1"):
            break
        await asyncio.sleep(0.05)
    assert stored(app, "LEFT-1")[0]["status"] == "processed"


async def test_many_connections_at_once(running_engine) -> None:
    app = running_engine

    async def one(i: int) -> list[str]:
        async with MLLPClient("127.0.0.1", app.port_of("ris-results"), read_timeout=30) as client:
            return [Message.parse(await client.send(oru(f"PAR-{i}-{j}"))).get("MSA-1") for j in range(20)]

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert all(code == "AA" for codes in results for code in codes)
    with app.db.connect() as conn:
        n = conn.execute(select(MESSAGES.c.id).where(MESSAGES.c.control_id.like("PAR-%"))).all()
    assert len(n) == 16 * 20


async def test_batch_in_one_frame_is_split_and_answered_with_a_batch_of_acks(running_engine) -> None:
    app = running_engine
    batch = (SAMPLES / "batch.hl7").read_bytes()
    async with MLLPClient("127.0.0.1", app.port_of("ris-orders"), read_timeout=20) as client:
        reply = await client.send(batch)
    assert reply.startswith(b"BHS|") and reply.rstrip(b"\r").endswith(b"BTS|3")
    assert reply.count(b"MSA|AA|") == 3
    with app.db.connect() as conn:
        rows = conn.execute(select(MESSAGES.c.control_id, MESSAGES.c.status).where(
            MESSAGES.c.channel == "ris-orders")).all()
    assert sorted(rows) == [("BAT0001", "processed"), ("BAT0002", "processed"), ("BAT0003", "processed")]
