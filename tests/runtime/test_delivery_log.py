"""A failed delivery is logged with the kind of failure (refused, negative ACK code ...), never the text."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient, start_server
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.runtime.delivery import failure_kind
from engine.store.models import Delivery

ROOT = Path(__file__).resolve().parents[2]
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_dead_deliveries_log_their_kind_without_phi(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def picky(body: bytes, _conn: object) -> bytes:  # refuses, quoting the patient as receivers do
        control_id = Message.parse(body).control_id
        return (f"MSH|^~\\&|PACS|RAD|ENGINE|HOSP|20261125120000||ACK|A1|P|2.5.1\r"
                f"MSA|AE|{control_id}\rERR|||207|E||||Patient Doe^Jane not known\r").encode()

    downstream = await start_server(picky, "127.0.0.1", 0)
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "engine.yaml").write_text(f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\ndicom:\n  enabled: false\n"
                                          "delivery:\n  max_attempts: 1\n")
    (tmp_path / "channels" / "out.yaml").write_text(f"""\
name: out
source: {{type: mllp, port: 0}}
destinations:
  - {{name: refused, type: mllp, host: 127.0.0.1, port: {_closed_port()}, connect_timeout: 5}}
  - {{name: picky, type: mllp, host: 127.0.0.1, port: {downstream.port}}}
""")
    registry = default_registry()
    app = EngineApp(load_config(tmp_path / "engine.yaml", registry, env={}), registry)
    caplog.set_level(logging.WARNING, logger="engine.runtime.delivery")
    await app.start()
    try:
        async with MLLPClient("127.0.0.1", app.port_of("out")) as client:
            assert b"MSA|AA" in await client.send((ROOT / "samples" / "hl7" / "oru_r01.hl7").read_bytes())
        states: list[str] = []
        for _ in range(200):
            with app.db.connect() as conn:
                states = list(conn.execute(select(DELIVERIES.c.state)))
            if [s[0] for s in states] == ["dead", "dead"]:
                break
            await asyncio.sleep(0.05)
        assert [s[0] for s in states] == ["dead", "dead"]
    finally:
        await app.stop()
        await downstream.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "engine.runtime.delivery"]
    assert any("destination=refused" in m and "state=dead error=connection-refused" in m for m in logged), logged
    assert any("destination=picky" in m and "state=dead error=negative-ack-AE" in m for m in logged), logged
    assert not any("Doe" in m or "Jane" in m for m in logged)


@pytest.mark.parametrize(("error", "kind"), [
    ("not delivered: ConnectionRefusedError: [Errno 111] Connect call failed ('10.0.0.1', 2575)",
     "connection-refused"),
    ("no ACK within the timeout (outcome unknown)", "ack-timeout"),
    ("not delivered: MLLPError: connect to pacs:2575 timed out", "connect-timeout"),
    ("AR: Doe^Jane locked", "negative-ack-AR"),
    ("HTTP 503: <html>Doe</html>", "http-503"),
    ("not delivered: SSLCertVerificationError: certificate verify failed", "tls-failure"),
    ("not delivered: ConnectionResetError: [Errno 104] reset by peer", "ConnectionResetError"),
    ("cannot write ORU0001.hl7: Permission denied", "file-not-written"),
    ("reply is not an HL7 ACK", "reply-not-an-ack"),
    ("something Doe said", "other"),
])
def test_failure_kinds(error: str, kind: str) -> None:
    assert failure_kind(error) == kind
