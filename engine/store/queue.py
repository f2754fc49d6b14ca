"""The durable delivery queue.

A delivery is claimed in one statement; a delivery is eligible only when no earlier delivery of
the same channel, destination and ordering key is still waiting or in flight, so per-key order
holds even with several engine processes (PostgreSQL: `FOR UPDATE SKIP LOCKED`).

A claim is owned: it names the node that holds it, a lease that node renews while it works
(`renew`), and a claim count. A result is recorded only by the current claim (node and count
match); a late result of a lapsed claim is discarded and logged. A delivery whose lease lapsed
(its node died or lost the database) is eligible again at once, and says why it went out again.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, exists, literal, or_, select, update
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


@dataclass(frozen=True)
class Owner:
    """Who claims: this engine node's name and how long a claim lasts unless renewed."""

    node: str = ""
    lease: timedelta = timedelta(seconds=30)


@dataclass
class ClaimedDelivery:
    id: int
    message_id: int
    destination: str
    ordering_key: str
    attempts: int
    payload: bytes
    content_type: str
    claimed_by: str = ""
    claims: int = 0  # this claim's number: the result is recorded only while it is current
    resent: str = ""  # why it goes out again ("" the first time)
    created_at: datetime | None = None  # when the unit queued it (a destination that waits measures from here)


DISCARDED = "discarded"  # record()'s state for a result whose claim had lapsed


def claim(engine: Engine, channel: str, *, limit: int = 32, owner: Owner = Owner()) -> list[ClaimedDelivery]:
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
    doing = DELIVERIES.c.state == DeliveryState.DOING
    lapsed = or_(
        DELIVERIES.c.lease_until < now,
        and_(DELIVERIES.c.lease_until.is_(None), DELIVERIES.c.claimed_at < now - owner.lease),  # an older claim
    )
    eligible = ((DELIVERIES.c.state == DeliveryState.PENDING) & (DELIVERIES.c.next_attempt_at <= now)) | (
        doing & lapsed
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
            .values(
                state=DeliveryState.DOING,
                claimed_at=now,
                updated_at=now,
                claimed_by=owner.node,
                lease_until=now + owner.lease,
                claims=DELIVERIES.c.claims + 1,
                # a delivery still `doing` was in flight at a node whose lease lapsed (every SET sees the old row)
                resent=case(
                    (doing, literal("resent: lease of node ") + DELIVERIES.c.claimed_by + literal(" lapsed")),
                    else_=DELIVERIES.c.resent,
                ),
            )
            .returning(
                DELIVERIES.c.id,
                DELIVERIES.c.message_id,
                DELIVERIES.c.destination,
                DELIVERIES.c.ordering_key,
                DELIVERIES.c.attempts,
                DELIVERIES.c.payload,
                DELIVERIES.c.content_type,
                DELIVERIES.c.claimed_by,
                DELIVERIES.c.claims,
                DELIVERIES.c.resent,
                DELIVERIES.c.created_at,
            )
        ).all()
    claimed = _opened(engine, [ClaimedDelivery(*row) for row in rows])
    claimed.sort(key=lambda d: d.id)
    return claimed


def renew(engine: Engine, ids: list[int], owner: Owner) -> int:
    """Extend the lease of the claims this node still holds (they are being delivered)."""
    if not ids:
        return 0
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_(ids), DELIVERIES.c.claimed_by == owner.node,
                   DELIVERIES.c.state == DeliveryState.DOING)
            .values(lease_until=now + owner.lease)
        )
    return int(result.rowcount or 0)


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
    `pending` after `retry_after` seconds with `attempts` unchanged. A result whose claim is no
    longer current (its lease lapsed and another node took the delivery) changes nothing: DISCARDED.
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
            d = attempt.delivery
            current = conn.execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.id == d.id, DELIVERIES.c.state == DeliveryState.DOING,
                       DELIVERIES.c.claimed_by == d.claimed_by, DELIVERIES.c.claims == d.claims)
                .values(**values)
            ).rowcount
            states[d.id] = values["state"] if current else DISCARDED
            if not current:
                log.warning("delivery %s (message %s): result of node %s's lapsed claim discarded; another "
                            "claim holds it now", d.id, d.message_id, d.claimed_by or "-")
    return states


def release_claims(engine: Engine, *, node: str | None = None, reason: str = "") -> int:
    """Put `doing` deliveries back to `pending`, with the reason they will go out again: every one
    (a store one process owns: at start-up its claims are a dead process's), or those of `node`
    (a node starting again under its name). Other nodes' claims lapse with their lease."""
    now = utcnow()
    where = [DELIVERIES.c.state == DeliveryState.DOING]
    if node is not None:
        where.append(DELIVERIES.c.claimed_by == node)
    with engine.begin() as conn:
        result = conn.execute(
            update(DELIVERIES)
            .where(*where)
            .values(state=DeliveryState.PENDING, next_attempt_at=now, updated_at=now, lease_until=None,
                    resent=reason or "resent: the engine stopped while it was in flight")
        )
    return int(result.rowcount or 0)


def claims_held(engine: Engine) -> dict[str, int]:
    """node name -> deliveries it holds in flight (`engine status`)."""
    from sqlalchemy import func

    with engine.connect() as conn:
        rows = conn.execute(
            select(DELIVERIES.c.claimed_by, func.count())
            .where(DELIVERIES.c.state == DeliveryState.DOING)
            .group_by(DELIVERIES.c.claimed_by)
        ).all()
    return {str(node): int(count) for node, count in rows}


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
