"""SIGKILL while 8 senders stream: after a restart nothing that got AA is missing, and every
queued delivery reaches the (idempotent) file destination exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import create_engine, select

from engine.hl7.mllp import MLLPClient, MLLPError
from engine.store.models import Message as StoredMessage

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = StoredMessage.__table__


def oru(control_id: str) -> bytes:
    return (ROOT / "samples" / "hl7" / "oru_r01.hl7").read_bytes().replace(b"|ORU0001|", f"|{control_id}|".encode())


async def stream(port: int, sender: int, acked: list[str], stop: asyncio.Event) -> None:
    client = MLLPClient("127.0.0.1", port, read_timeout=5, connect_timeout=2)
    i = 0
    try:
        while not stop.is_set():
            cid = f"K{sender}-{i}"
            i += 1
            try:
                reply = await client.send(oru(cid))
            except (MLLPError, OSError):
                return
            if b"MSA|AA|" + cid.encode() in reply:
                acked.append(cid)
    finally:
        await client.close()


def test_sigkill_loses_nothing_acked(engine_process, tmp_path: Path) -> None:
    engine_process.start()
    port = engine_process.results_port
    acked: list[str] = []

    async def load() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(stream(port, s, acked, stop)) for s in range(8)]
        while len(acked) < 400:
            await asyncio.sleep(0.05)
        engine_process.kill()
        await asyncio.gather(*tasks)

    asyncio.run(asyncio.wait_for(load(), 120))
    assert len(acked) >= 400

    engine_process.start()  # restart on the same store: the queue drains
    db = create_engine(engine_process.env["ENGINE_STORAGE_URL"])
    with db.connect() as conn:
        rows = conn.execute(select(MESSAGES.c.id, MESSAGES.c.control_id, MESSAGES.c.status, MESSAGES.c.raw)).all()
    db.dispose()
    by_control = {r.control_id: r for r in rows}
    assert [c for c in acked if c not in by_control] == []
    assert all(by_control[c].status == "processed" for c in acked)
    processed = {r.id: r.raw for r in rows if r.status == "processed"}
    outbox = tmp_path / "outbox"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(outbox.glob("*.hl7"))) < len(processed):
        time.sleep(0.2)
    files = {int(f.stem.rsplit("-", 1)[1]): f.read_bytes() for f in outbox.glob("*.hl7")}
    assert files == processed  # one file per processed message, with its exact bytes
