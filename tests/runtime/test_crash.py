"""SIGKILL while 8 senders stream: after a restart nothing that got AA is missing, and every
queued delivery reaches the (idempotent) file destination exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, select

from engine.hl7.mllp import MLLPClient, MLLPError
from engine.store.models import Message as StoredMessage

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = StoredMessage.__table__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_engine(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # a file, not a pipe: a full pipe would stall the engine
        proc = subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(ROOT / "engine.yaml")],
                                env=env, stdout=out, stderr=out)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace")) from None
            time.sleep(0.1)
    raise RuntimeError("engine did not start")


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


def test_sigkill_loses_nothing_acked(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ)
    env.update({
        "ENGINE_STORAGE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
        "ORDERS_MLLP_PORT": str(free_port()), "RESULTS_MLLP_PORT": str(port), "DICOM_PORT": str(free_port()),
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"), "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "ENGINE_LOG_LEVEL": "WARNING",
    })
    proc = start_engine(env, port, tmp_path / "engine.log")
    acked: list[str] = []

    async def load() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(stream(port, s, acked, stop)) for s in range(8)]
        while len(acked) < 400:
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)

    asyncio.run(asyncio.wait_for(load(), 120))
    proc.wait(timeout=30)
    assert len(acked) >= 400

    proc = start_engine(env, port, tmp_path / "engine.log")  # restart on the same store: the queue drains
    try:
        db = create_engine(env["ENGINE_STORAGE_URL"])
        with db.connect() as conn:
            rows = conn.execute(select(MESSAGES.c.id, MESSAGES.c.control_id, MESSAGES.c.status,
                                       MESSAGES.c.raw)).all()
        by_control = {r.control_id: r for r in rows}
        missing = [c for c in acked if c not in by_control]
        assert missing == []
        assert all(by_control[c].status == "processed" for c in acked)
        processed = {r.id: r.raw for r in rows if r.status == "processed"}
        outbox = tmp_path / "outbox"
        deadline = time.time() + 60
        while time.time() < deadline and len(list(outbox.glob("*.hl7"))) < len(processed):
            time.sleep(0.2)
        files = {int(f.stem.rsplit("-", 1)[1]): f.read_bytes() for f in outbox.glob("*.hl7")}
        assert files == processed  # one file per processed message, with its exact bytes
        db.dispose()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
