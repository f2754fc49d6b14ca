"""Operator replay: revive dead deliveries, or run a stored message through its channel again.

Reprocessing stores a new message row (`replay_of` names the original) and applies its effects
anew; reviving only puts the dead deliveries back in the queue for the running engine to drain.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from engine.runtime.app import default_registry
from engine.runtime.config import LoadedConfig
from engine.runtime.pipeline import Pipeline
from engine.store import queue
from engine.store.db import init_db, make_engine
from engine.store.messages import get_message
from engine.store.models import DeliveryState
from engine.store.writer import Writer


async def replay(loaded: LoadedConfig, message_ids: list[int], *, reprocess: bool = False) -> list[str]:
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
            dead = [d for d in queue.deliveries_for(db, mid) if d["state"] == DeliveryState.DEAD]
            if dead and not reprocess:
                n = queue.revive(db, mid)
                lines.append(f"{mid}: {n} dead deliver{'y' if n == 1 else 'ies'} queued again")
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
