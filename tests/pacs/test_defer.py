"""Contract C4: a deferred delivery goes back to `pending` after retry_after, attempts unchanged,
and keeps the head of its ordering key (on SQLite and on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, insert, select, update

from engine.store import queue
from engine.store.db import init_db, make_engine
from engine.store.models import Delivery, DeliveryState, Message, utcnow

DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
MESSAGES = Message.__table__  # type: ignore[attr-defined]


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    init_db(eng)
    yield eng
    eng.dispose()


def add(db: Engine, key: str) -> int:
    with db.begin() as conn:
        mid = conn.execute(insert(MESSAGES).values(channel="ch", raw=b"{}")).inserted_primary_key[0]
        return int(conn.execute(insert(DELIVERIES).values(
            message_id=mid, channel="ch", destination="imagingstudy", ordering_key=key, payload=b"p",
        )).inserted_primary_key[0])


def test_defer_keeps_attempts_and_order(db: Engine) -> None:
    policy = queue.RetryPolicy(max_attempts=2, base=0.1, cap=1)
    first, second = add(db, "study:1"), add(db, "study:1")
    for _ in range(5):  # more deferrals than max_attempts: never dead
        [claimed] = queue.claim(db, "ch")
        assert claimed.id == first and claimed.attempts == 0 and claimed.created_at is not None
        states = queue.record(db, [queue.Attempt(claimed, ok=False, retry=True, response="waiting for images",
                                                 retry_after=600, defer=True)], policy)
        assert states[first] == DeliveryState.PENDING
        with db.connect() as conn:
            r = conn.execute(select(DELIVERIES).where(DELIVERIES.c.id == first)).one()
        assert r.attempts == 0 and r.response == "waiting for images"
        nxt = r.next_attempt_at.replace(tzinfo=None) - utcnow().replace(tzinfo=None)
        assert nxt > timedelta(seconds=300)  # after retry_after, not the back-off
        assert queue.claim(db, "ch") == []  # the second of the key waits behind the deferred head
        with db.begin() as conn:
            conn.execute(update(DELIVERIES).where(DELIVERIES.c.id == first).values(next_attempt_at=utcnow()))
    [claimed] = queue.claim(db, "ch")
    assert queue.record(db, [queue.Attempt(claimed, ok=True)], policy)[first] == DeliveryState.DONE
    [after] = queue.claim(db, "ch")
    assert after.id == second
