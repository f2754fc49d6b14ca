"""The shipped engine on PostgreSQL: ACK after commit, resend de-duplication, queued delivery."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store.models import Message as StoredMessage

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = StoredMessage.__table__


async def test_engine_on_postgresql(db_url: str, env_for, tmp_path: Path) -> None:
    registry = default_registry()
    loaded = load_config(ROOT / "engine.yaml", registry, env=env_for(db_url))
    app = EngineApp(loaded, registry)
    await app.start()
    try:
        body = (ROOT / "samples" / "hl7" / "oru_r01.hl7").read_bytes()
        async with MLLPClient("127.0.0.1", app.port_of("ris-results"), read_timeout=20) as client:
            first = Message.parse(await client.send(body))
            again = Message.parse(await client.send(body))
        assert first.get("MSA-1") == "AA" and first.to_er7() == again.to_er7()
        with app.db.connect() as conn:
            statuses = [r[0] for r in conn.execute(select(MESSAGES.c.status).order_by(MESSAGES.c.id))]
        assert statuses == ["processed", "duplicate"]
        for _ in range(100):
            if list((tmp_path / "outbox").glob("*.hl7")):
                break
            await asyncio.sleep(0.05)
        assert [f.read_bytes() for f in (tmp_path / "outbox").glob("*.hl7")] == [body]
    finally:
        await app.stop()
