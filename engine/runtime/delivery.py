"""Drains a channel's queued deliveries: claim a group, deliver, record the group at once.

A claim returns at most the head of each ordering key, so per-key order holds; heads of different
keys go out concurrently. The claims are this node's: their lease is renewed while the group is
out (however slow the receiver), and a result is recorded only while the claim is still ours. The
database calls run in a worker thread so the event loop keeps answering senders meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import re

from sqlalchemy import Engine

from engine.runtime.destinations.base import DeliveryOutcome, Payload, QueuedDestination
from engine.store import queue

log = logging.getLogger(__name__)

_NEGATIVE_ACK = re.compile(r"^(AE|AR|CE|CR)\b")
_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")
_EXCEPTION = re.compile(r"\b([A-Z][A-Za-z]*(?:Error|Exception|Timeout|Refused))\b")


def failure_kind(error: str) -> str:
    """What kind of failure a delivery error is, in words that never carry message content.

    The destination's text may quote the receiver (ERR-8, an HTTP body: PHI); the log gets one of a
    fixed set of kinds, an ACK code, an HTTP status or an exception class name. `engine messages
    show` has the whole text.
    """
    lowered = error.lower()
    if m := _NEGATIVE_ACK.match(error):
        return f"negative-ack-{m.group(1)}"
    if m := _HTTP_STATUS.search(error):
        return f"http-{m.group(1)}"
    if "connectionrefused" in lowered or "connection refused" in lowered:
        return "connection-refused"
    if "no ack within" in lowered:
        return "ack-timeout"
    if "connect" in lowered and "timed out" in lowered:
        return "connect-timeout"
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "ssl" in lowered or "certificate" in lowered:
        return "tls-failure"
    if "reply is not an hl7 ack" in lowered:
        return "reply-not-an-ack"
    if "ack answers control id" in lowered:
        return "ack-for-another-message"
    if "is not configured" in lowered:
        return "destination-not-configured"
    if lowered.startswith("cannot write"):
        return "file-not-written"
    if m := _EXCEPTION.search(error):
        return m.group(1)
    return "other"


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
        owner: queue.Owner = queue.Owner(),
        renew_every: float | None = None,
        record_every: float = 0.1,
    ) -> None:
        self.db = db
        self.channel = channel
        self.destinations = destinations
        self.policy = policy
        self.poll_interval = poll_interval
        self.batch = batch
        self.owner = owner
        self.record_every = record_every
        # renewed well before the lease lapses: a third of it, so two renewals may fail in a row
        self.renew_every = renew_every if renew_every is not None else owner.lease.total_seconds() / 3
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
        claimed = await asyncio.to_thread(queue.claim, self.db, self.channel, limit=self.batch, owner=self.owner)
        if not claimed:
            return 0
        for d in claimed:
            if d.resent:
                log.warning("channel=%s delivery=%s destination=%s message=%s %s", self.channel, d.id,
                            d.destination, d.message_id, d.resent)
        out = {d.id for d in claimed}  # claims still being delivered: their lease is renewed
        renewing = asyncio.create_task(self._renew(out))
        running = {asyncio.ensure_future(self._deliver(d)): d for d in claimed}
        loop = asyncio.get_running_loop()
        try:
            # results are recorded as they come in, those of up to `record_every` seconds together:
            # a crash re-sends what was out or finished within that time, not the whole group, and
            # a fast receiver still costs one commit per many deliveries
            pending = set(running)
            finished: list[tuple[queue.ClaimedDelivery, DeliveryOutcome]] = []
            since = 0.0
            while pending:
                wait = None if not finished else max(0.0, since + self.record_every - loop.time())
                done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if done and not finished:
                    since = loop.time()
                finished += [(running[t], t.result()) for t in done]
                if finished and (not pending or loop.time() - since >= self.record_every):
                    await self._record(finished)
                    out.difference_update(d.id for d, _ in finished)
                    finished = []
        finally:
            renewing.cancel()
        return len(claimed)

    async def _record(self, finished: list[tuple[queue.ClaimedDelivery, DeliveryOutcome]]) -> None:
        attempts = [queue.Attempt(d, o.ok, o.retry, o.response, o.error, o.retry_after, o.defer) for d, o in finished]
        states = await asyncio.to_thread(queue.record, self.db, attempts, self.policy)
        for d, o in finished:
            if not o.ok and not o.defer and states[d.id] != queue.DISCARDED:
                log.warning(
                    "channel=%s delivery=%s destination=%s message=%s state=%s error=%s",
                    self.channel,
                    d.id,
                    d.destination,
                    d.message_id,
                    states[d.id],
                    failure_kind(o.error),
                )

    async def _renew(self, ids: set[int]) -> None:
        """Keep the group's claims while they are out (`ids` shrinks as results are recorded)."""
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                await asyncio.to_thread(queue.renew, self.db, sorted(ids), self.owner)
            except Exception as exc:
                log.warning("channel %s: claim lease renewal failed (%s); retrying", self.channel, type(exc).__name__)

    async def _deliver(self, d: queue.ClaimedDelivery) -> DeliveryOutcome:
        dest = self.destinations.get(d.destination)
        if dest is None:
            return DeliveryOutcome(ok=False, retry=True, error=f"destination {d.destination!r} is not configured")
        payload = Payload(
            d.payload,
            d.ordering_key,
            d.content_type,
            meta={"message_id": d.message_id, "delivery_id": d.id, "channel": self.channel,
                  "created_at": d.created_at, "attempts": d.attempts},
        )
        try:
            return await dest.deliver(payload)
        except Exception as exc:
            log.exception("destination %s raised", d.destination)
            return DeliveryOutcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
