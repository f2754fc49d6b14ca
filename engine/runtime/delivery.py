"""Drains a channel's queued deliveries: claim a group, deliver, record the group at once.

A claim returns at most the head of each ordering key, so per-key order holds; heads of different
keys go out concurrently. The database calls run in a worker thread so the event loop keeps
answering senders meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import Engine

from engine.runtime.destinations.base import DeliveryOutcome, Payload, QueuedDestination
from engine.store import queue

log = logging.getLogger(__name__)


class DeliveryWorker:
    def __init__(
        self,
        db: Engine,
        channel: str,
        destinations: dict[str, QueuedDestination],
        policy: queue.RetryPolicy,
        *,
        poll_interval: float = 0.2,
        batch: int = 64,
        stall: timedelta = timedelta(minutes=5),
    ) -> None:
        self.db = db
        self.channel = channel
        self.destinations = destinations
        self.policy = policy
        self.poll_interval = poll_interval
        self.batch = batch
        self.stall = stall
        self.wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"deliveries-{self.channel}")

    async def stop(self) -> None:
        self._stopping = True
        self.wakeup.set()
        if self._task is not None:
            await self._task

    def poke(self) -> None:
        self.wakeup.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                done = await self.drain_once()
            except Exception:
                log.exception("delivery worker for channel %s failed; retrying", self.channel)
                done = 0
            if done == 0:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), self.poll_interval)
                except TimeoutError:
                    pass
                self.wakeup.clear()

    async def drain_once(self) -> int:
        claimed = await asyncio.to_thread(queue.claim, self.db, self.channel, limit=self.batch, stall=self.stall)
        if not claimed:
            return 0
        outcomes = await asyncio.gather(*(self._deliver(d) for d in claimed))
        attempts = [
            queue.Attempt(d, o.ok, o.retry, o.response, o.error) for d, o in zip(claimed, outcomes, strict=True)
        ]
        states = await asyncio.to_thread(queue.record, self.db, attempts, self.policy)
        for d, o in zip(claimed, outcomes, strict=True):
            if not o.ok:
                # the receiver's text may quote the message (PHI): the log names its kind only;
                # `engine messages show` has the whole text
                log.warning(
                    "channel=%s delivery=%s destination=%s message=%s state=%s error=%s",
                    self.channel,
                    d.id,
                    d.destination,
                    d.message_id,
                    states[d.id],
                    o.error.split(":", 1)[0][:40],
                )
        return len(claimed)

    async def _deliver(self, d: queue.ClaimedDelivery) -> DeliveryOutcome:
        dest = self.destinations.get(d.destination)
        if dest is None:
            return DeliveryOutcome(ok=False, retry=True, error=f"destination {d.destination!r} is not configured")
        payload = Payload(
            d.payload,
            d.ordering_key,
            d.content_type,
            meta={"message_id": d.message_id, "delivery_id": d.id, "channel": self.channel},
        )
        try:
            return await dest.deliver(payload)
        except Exception as exc:
            log.exception("destination %s raised", d.destination)
            return DeliveryOutcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
