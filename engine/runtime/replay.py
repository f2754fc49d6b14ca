"""Operator reprocessing: run stored messages through their channel again.

Each is stored as a new message row (`replay_of` names the original) and its effects are applied
anew. (Reviving dead deliveries needs no channel: `engine.store.queue.revive`.)
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from engine.runtime.app import default_registry
from engine.runtime.config import LoadedConfig
from engine.runtime.pipeline import Pipeline
from engine.store.db import init_db, make_engine
from engine.store.messages import get_message
from engine.store.writer import Writer


async def replay(loaded: LoadedConfig, message_ids: list[int]) -> list[str]:
    db = make_engine(loaded.storage_url)
    await asyncio.to_thread(init_db, db)
    registry = default_registry()
    writer = Writer(db, dedupe_window=timedelta(hours=loaded.engine.storage.dedupe_window_hours))
    writer.start()
    specs = {s.config.name: s for s in loaded.channels}
    channels: dict[str, Pipeline] = {}
    lines = []
    try:
        for mid in message_ids:
            row = get_message(db, mid)
            if row is None:
                lines.append(f"{mid}: no such message")
                continue
            spec = specs.get(row["channel"])
            if spec is None:
                lines.append(f"{mid}: channel {row['channel']} is no longer configured")
                continue
            if spec.config.name not in channels:
                channels[spec.config.name] = Pipeline.build(spec, registry, writer, loaded.base_dir)
            result = await channels[spec.config.name].receive(row["raw"], replay_of=mid)
            detail = f" ({result.error})" if result.error else ""
            lines.append(f"{mid}: reprocessed as message {result.message_id}, status {result.status}{detail}")
    finally:
        await asyncio.to_thread(writer.stop)
        db.dispose()
    return lines
