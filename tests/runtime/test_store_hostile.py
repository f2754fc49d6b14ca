"""Store as received, always: values a database cannot take in a column (NUL, over-long ids) are
cleaned for the columns only, the raw body stays byte-exact, one bad unit never takes its
neighbours down, resends of long ids are still found, and every message in a batch is answered.
Over real sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store.models import Message as StoredMessage

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__


def engine_env(tmp_path: Path, url: str) -> dict[str, str]:
    return {
        "ENGINE_STORAGE_URL": url,
        "ORDERS_MLLP_PORT": "0",
        "RESULTS_MLLP_PORT": "0",
        "DICOM_PORT": "0",
        "HTTP_PORT": "0",
        "MEDS_ARCHIVE_DIR": str(tmp_path / "meds-archive"),
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"),
        "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
    }


@pytest.fixture
async def app(tmp_path: Path, db_url: str) -> AsyncIterator[EngineApp]:
    registry = default_registry()
    engine_app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=engine_env(tmp_path, db_url)), registry)
    await engine_app.start()
    try:
        yield engine_app
    finally:
        await engine_app.stop()


def oru(control_id: str = "ORU0001", *, sender: str = "RIS", patient: str | None = None) -> bytes:
    body = (SAMPLES / "oru_r01.hl7").read_bytes().replace(b"|ORU0001|", f"|{control_id}|".encode())
    body = body.replace(b"MSH|^~\\&|RIS|", f"MSH|^~\\&|{sender}|".encode(), 1)
    if patient is not None:
        msg = Message.parse(body)
        msg.set("PID-3.1", patient, raw=True)
        body = msg.encode()
    return body


async def send(app: EngineApp, body: bytes) -> bytes:
    async with MLLPClient("127.0.0.1", app.port_of("ris-results"), read_timeout=20) as client:
        return await client.send(body)


def rows(app: EngineApp) -> list[dict[str, object]]:
    assert app.db is not None
    with app.db.connect() as conn:
        return [dict(r) for r in conn.execute(select(MESSAGES).order_by(MESSAGES.c.id)).mappings()]


@pytest.mark.parametrize("where", ["control_id", "sender", "patient"])
async def test_a_nul_byte_is_stored_and_answered_and_spares_its_neighbours(app: EngineApp, where: str) -> None:
    bad = {
        "control_id": oru("NUL\x00ID"),
        "sender": oru("NUL-S", sender="R\x00IS"),
        "patient": oru("NUL-P", patient="P\x001"),
    }[where]
    goods = [oru(f"GOOD-{where}-{i}") for i in range(6)]
    answers = await asyncio.gather(*(send(app, b) for b in [*goods[:3], bad, *goods[3:]]))
    codes = [Message.parse(a).get("MSA-1") for a in answers]
    assert codes == ["AA"] * 7, codes
    stored = rows(app)
    assert len(stored) == 7
    assert sorted(r["raw"] for r in stored) == sorted([*goods, bad])  # byte-exact, the NUL kept
    assert all("\x00" not in str(r["control_id"]) + str(r["sender"]) + str(r["patient_id"]) for r in stored)


async def test_a_long_control_id_is_processed_once_and_resends_are_found(app: EngineApp) -> None:
    long_id = "X" * 250
    answers = [Message.parse(await send(app, oru(long_id))) for _ in range(3)]
    assert [a.get("MSA-1") for a in answers] == ["AA"] * 3
    assert all(a.get("MSA-2") == long_id for a in answers)
    stored = rows(app)
    assert [r["status"] for r in stored] == ["processed", "duplicate", "duplicate"]
    other = "X" * 240 + "Y" * 10  # shares the first 200 characters: a different message
    assert Message.parse(await send(app, oru(other))).get("MSA-1") == "AA"
    assert rows(app)[-1]["status"] == "processed"


async def test_an_overlong_patient_id_does_not_fail_the_store(app: EngineApp) -> None:
    ack = Message.parse(await send(app, oru("LONG-PID", patient="9" * 5000)))
    assert ack.get("MSA-1") == "AA"
    (row,) = rows(app)
    assert row["status"] == "processed" and len(str(row["patient_id"])) == 200


async def test_every_message_in_a_batch_is_stored_and_answered(app: EngineApp) -> None:
    one, two = oru("B-1"), oru("B-2")
    frame = b"BHS|^~\\&|RIS\r" + b"PID|1||ORPHAN\rOBX|1|TX|x\r" + one + two + b"BTS|3\r"
    reply = await send(app, frame)
    segments = [s for s in reply.split(b"\r") if s]
    assert segments[0].startswith(b"BHS") and segments[-1] == b"BTS|3"
    msas = [s for s in segments if s.startswith(b"MSA")]
    assert [m.split(b"|")[1] for m in msas] == [b"AR", b"AA", b"AA"]
    stored = rows(app)
    assert [r["status"] for r in stored] == ["error", "processed", "processed"]
    assert stored[0]["raw"] == b"PID|1||ORPHAN\rOBX|1|TX|x\r"


async def test_a_batch_with_no_message_is_stored_and_refused(app: EngineApp) -> None:
    frame = b"BHS|^~\\&|RIS\rBTS|0\r"
    reply = Message.parse(await send(app, frame))
    assert reply.get("MSA-1") == "AR"
    (row,) = rows(app)
    assert row["status"] == "error" and row["raw"] == frame


async def test_overlong_order_values_are_cut_or_refused_never_a_store_error(app: EngineApp) -> None:
    """PID-5 / OBR-18 / PID-3.1 of thousands of characters used to fail PostgreSQL's index rows."""
    sample = (SAMPLES / "orm_o01_ct.hl7").read_bytes()

    async def order(control_id: str, **fields: str) -> Message:
        msg = Message.parse(sample)
        msg.set("MSH-10", control_id, raw=True)
        for path, value in fields.items():
            msg.set(path, value, raw=True)
        async with MLLPClient("127.0.0.1", app.port_of("ris-orders"), read_timeout=20) as client:
            return Message.parse(await client.send(msg.encode()))

    cut = await order("LONG-1", **{"PID-5": "N" * 5000, "OBR-18": "A" * 3000, "ORC-3": "F" * 3000})
    assert cut.get("MSA-1") == "AA", cut.text
    assert all(e.fields[4] == "W" for e in cut.segments("ERR")) and cut.segments("ERR")
    refused = await order("LONG-2", **{"PID-3.1": "9" * 3000})
    assert refused.get("MSA-1") == "AE" and refused.get("ERR-3.1") == "102", refused.text  # never cut: dropped
    stored = {r["control_id"]: r["status"] for r in rows(app)}
    assert stored == {"LONG-1": "processed", "LONG-2": "error"}
