"""TLS configured in channel YAML: a mutual-TLS listener and a TLS MLLP destination."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import select

from engine.hl7.ack import build_ack
from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient, MLLPError, client_ssl_context, server_ssl_context, start_server
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store.models import Delivery

ROOT = Path(__file__).resolve().parents[2]
DELIVERIES = Delivery.__table__


async def test_mutual_tls_listener_and_tls_destination(tmp_path: Path, pki: Any) -> None:
    received: list[str] = []

    async def receiver(body: bytes, _conn: object) -> bytes:
        msg = Message.parse(body)
        received.append(msg.control_id)
        return build_ack(msg, "AA").encode()

    downstream = await start_server(receiver, "127.0.0.1", 0, ssl=server_ssl_context(pki.p("server.crt"),
                                                                                        pki.p("server.key")))
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "engine.yaml").write_text(f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\ndicom:\n  enabled: false\n")
    (tmp_path / "channels" / "secure.yaml").write_text(f"""\
name: secure
source:
  type: mllp
  port: 0
  tls: {{cert: {pki.p("server.crt")}, key: {pki.p("server.key")}, ca: {pki.p("ca.crt")}, require_client_cert: true}}
destinations:
  - name: forward
    type: mllp
    host: 127.0.0.1
    port: {downstream.port}
    tls: {{cert: {pki.p("client.crt")}, key: {pki.p("client.key")}, ca: {pki.p("ca.crt")}}}
""")
    registry = default_registry()
    app = EngineApp(load_config(tmp_path / "engine.yaml", registry, env={}), registry)
    await app.start()
    try:
        body = (ROOT / "samples" / "hl7" / "oru_r01.hl7").read_bytes()
        good = client_ssl_context(pki.p("ca.crt"), pki.p("client.crt"), pki.p("client.key"))
        async with MLLPClient("127.0.0.1", app.port_of("secure"), ssl=good, server_hostname="localhost") as client:
            assert b"MSA|AA|ORU0001" in await client.send(body)
        anonymous = client_ssl_context(pki.p("ca.crt"))
        refused = MLLPClient("127.0.0.1", app.port_of("secure"), ssl=anonymous, server_hostname="localhost",
                             read_timeout=5)
        try:
            await refused.send(body.replace(b"ORU0001", b"ORU0002"))
            raise AssertionError("a client without a certificate was served")
        except (MLLPError, OSError):
            pass
        finally:
            await refused.close()
        # the receiver has the message before the worker records the delivery: wait for the record
        states: list[str] = []
        for _ in range(200):
            with app.db.connect() as conn:
                states = list(conn.execute(select(DELIVERIES.c.state)).scalars())
            if states == ["done"]:
                break
            await asyncio.sleep(0.05)
        assert states == ["done"]
        assert received == ["ORU0001"]
    finally:
        await app.stop()
        await downstream.close()
