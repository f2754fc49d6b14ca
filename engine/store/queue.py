"""The durable delivery queue.

A delivery is claimed in one statement; a delivery is eligible only when no earlier delivery of
the same channel, destination and ordering key is still waiting or in flight, so per-key order
holds even with several engine processes (PostgreSQL: `FOR UPDATE SKIP LOCKED`). A delivery
stuck in `doing` longer than the stall timeout (its worker died) becomes eligible again.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, exists, select, update
from sqlalchemy.orm import aliased

from engine.store import crypto
from engine.store.models import Delivery, DeliveryState, Message, utcnow

log = logging.getLogger(__name__)

# a payload no configured key opens waits this long before it is tried again (the keyring may be fixed)
UNREADABLE_WAIT = timedelta(minutes=1)

DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
MESSAGES = Message.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with a cap and jitter; `dead` after max_attempts."""

    max_attempts: int = 10
    base: float = 1.0
    cap: float = 300.0
    jitter: float = 0.2

    def wait(self, attempts: int) -> float:
        delay = min(self.cap, self.base * (2 ** max(0, attempts - 1)))
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def decide(self, attempts: int) -> float | None:
        """Seconds until the next attempt, or None when the delivery should go dead."""
        if attempts >= self.max_attempts:
            return None
        return self.wait(attempts)


@dataclass
class ClaimedDelivery:
    id: int
    message_id: int
    destination: str
    ordering_key: str
    attempts: int
    payload: bytes
    content_type: str
    created_at: datetime | None = None  # when the unit queued it (a destination that waits measures from here)


def claim(
    engine: Engine, channel: str, *, limit: int = 32, stall: timedelta = timedelta(minutes=5)
) -> list[ClaimedDelivery]:
    now = utcnow()
    earlier = aliased(DELIVERIES)
    live = [DeliveryState.PENDING, DeliveryState.DOING]
    blocked = exists().where(
        and_(
            earlier.c.channel == DELIVERIES.c.channel,
            earlier.c.destination == DELIVERIES.c.destination,
            earlier.c.ordering_key == DELIVERIES.c.ordering_key,
            earlier.c.id < DELIVERIES.c.id,
            earlier.c.state.in_(live),
        )
    )
    eligible = ((DELIVERIES.c.state == DeliveryState.PENDING) & (DELIVERIES.c.next_attempt_at <= now)) | (
        (DELIVERIES.c.state == DeliveryState.DOING) & (DELIVERIES.c.claimed_at < now - stall)
    )
    candidates = (
        select(DELIVERIES.c.id)
        .where(DELIVERIES.c.channel == channel, eligible, ~blocked)
        .order_by(DELIVERIES.c.id)
        .limit(limit)
    )
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True, of=DELIVERIES)
        ids = [row[0] for row in conn.execute(candidates)]
        if not ids:
            return []
        rows = conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_(ids))
            .values(state=DeliveryState.DOING, claimed_at=now, updated_at=now)
            .returning(
                DELIVERIES.c.id,
                DELIVERIES.c.message_id,
                DELIVERIES.c.destination,
                DELIVERIES.c.ordering_key,
                DELIVERIES.c.attempts,
                DELIVERIES.c.payload,
                DELIVERIES.c.content_type,
                DELIVERIES.c.created_at,
            )
        ).all()
    claimed = _opened(engine, [ClaimedDelivery(*row) for row in rows])
    claimed.sort(key=lambda d: d.id)
    return claimed


def _opened(engine: Engine, claimed: list[ClaimedDelivery]) -> list[ClaimedDelivery]:
    """Payloads opened (ENGINE_KEY); one that no configured key opens goes back to `pending` with the
    reason, tried again later, and is not handed to a destination."""
    ready: list[ClaimedDelivery] = []
    for d in claimed:
        try:
            d.payload = crypto.open_value(d.payload, crypto.PAYLOAD)
        except crypto.UnreadableValue as exc:
            log.error("delivery %s (message %s) cannot be opened: %s", d.id, d.message_id, exc)
            now = utcnow()
            with engine.begin() as conn:
                conn.execute(
                    update(DELIVERIES)
                    .where(DELIVERIES.c.id == d.id)
                    .values(state=DeliveryState.PENDING, next_attempt_at=now + UNREADABLE_WAIT, updated_at=now,
                            last_error=str(exc)[:2000])
                )
            continue
        ready.append(d)
    return ready


@dataclass
class Attempt:
    """The outcome of one delivery attempt, to be recorded."""

    delivery: ClaimedDelivery
    ok: bool
    retry: bool = False
    response: str = ""
    error: str = ""
    retry_after: float | None = None  # the remote's Retry-After: the back-off waits at least this long
    defer: bool = False  # not ready yet (images still arriving): pending again after retry_after, no attempt spent


def record(engine: Engine, attempts: list[Attempt], policy: RetryPolicy) -> dict[int, str]:
    """Record a group of attempts in one transaction; returns delivery id -> new state.

    A success is `done`; a retryable failure goes back to `pending` after a back-off, or `dead`
    once the policy says so; a non-retryable failure is `dead` at once. A deferral goes back to
    `pending` after `retry_after` seconds with `attempts` unchanged.
    """
    now = utcnow()
    states: dict[int, str] = {}
    with engine.begin() as conn:
        for attempt in attempts:
            count = attempt.delivery.attempts + 1
            values: dict[str, Any] = {
                "attempts": count,
                "response": attempt.response[:4000],
                "last_error": attempt.error[:2000],
                "updated_at": now,
            }
            if attempt.ok:
                values["state"] = DeliveryState.DONE
            elif attempt.defer:
                values["attempts"] = attempt.delivery.attempts
                values["state"] = DeliveryState.PENDING
                values["next_attempt_at"] = now + timedelta(seconds=max(0.0, attempt.retry_after or policy.base))
            else:
                wait = policy.decide(count) if attempt.retry else None
                if wait is not None and attempt.retry_after is not None:
                    wait = max(wait, min(attempt.retry_after, policy.cap))
                if wait is None:
                    values["state"] = DeliveryState.DEAD
                else:
                    values["state"] = DeliveryState.PENDING
                    values["next_attempt_at"] = now + timedelta(seconds=wait)
            conn.execute(update(DELIVERIES).where(DELIVERIES.c.id == attempt.delivery.id).values(**values))
            states[attempt.delivery.id] = values["state"]
    return states


def release_claims(engine: Engine) -> int:
    """Put every `doing` delivery back to `pending`. Only for a store one process owns (SQLite):
    at start-up its claims can only be left over from a process that died mid-delivery. (With
    PostgreSQL other live processes may hold claims; there the stall timeout takes them back.)"""
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.state == DeliveryState.DOING)
            .values(state=DeliveryState.PENDING, next_attempt_at=now, updated_at=now)
        )
    return int(result.rowcount or 0)


def revive(engine: Engine, message_id: int) -> int:
    """Put a message's dead deliveries back in the queue (operator replay)."""
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.message_id == message_id, DELIVERIES.c.state == DeliveryState.DEAD)
            .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, updated_at=now)
        )
    return int(result.rowcount or 0)


def deliveries_for(engine: Engine, message_id: int, *, payloads: bool = True) -> list[dict[str, Any]]:
    """A message's deliveries, oldest first; each payload opened (ENGINE_KEY), or left out."""
    cols = [c for c in DELIVERIES.columns if payloads or c.name != "payload"]
    with engine.connect() as conn:
        rows = (
            conn.execute(select(*cols).where(DELIVERIES.c.message_id == message_id).order_by(DELIVERIES.c.id))
            .mappings()
            .all()
        )
    found = [dict(r) for r in rows]
    if payloads:
        for d in found:
            d["payload"] = crypto.open_value(d["payload"], crypto.PAYLOAD)
    return found
