"""The writer and the delivery queue, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select

from engine.errors import ProcessingError
from engine.store import queue
from engine.store.db import init_db, make_engine
from engine.store.models import Delivery, DeliveryState, Message, MessageStatus, utcnow
from engine.store.writer import QueuedPayload, WorkUnit, Writer

MESSAGES = Message.__table__
DELIVERIES = Delivery.__table__


@pytest.fixture
def db(db_url: str):
    eng = make_engine(db_url)
    init_db(eng)
    yield eng
    eng.dispose()


def unit(control_id: str, raw: bytes = b"MSH|...", **kw) -> WorkUnit:
    kw.setdefault("answer", lambda status, err: f"ACK {status} {err.code if err else ''}")
    return WorkUnit("ch", raw, utcnow(), control_id=control_id, message_type="ORM^O01", sender="RIS|H", **kw)


def queued(destination: str = "d", key: str = "k"):
    return lambda conn, mid: [QueuedPayload(destination, f"payload-{mid}".encode(), key)]


async def test_group_commit_keeps_each_unit(db) -> None:
    writer = Writer(db)
    writer.start()
    try:
        results = await asyncio.gather(*(writer.submit(unit(f"C{i}", effects=queued())) for i in range(50)))
    finally:
        writer.stop()
    assert [r.status for r in results] == ["processed"] * 50
    assert len({r.message_id for r in results}) == 50
    with db.connect() as conn:
        assert conn.execute(select(MESSAGES.c.id)).all().__len__() == 50
        assert conn.execute(select(DELIVERIES.c.id)).all().__len__() == 50
    assert results[0].answer == "ACK processed "


async def test_failing_unit_is_stored_as_error_and_neighbours_commit(db) -> None:
    def boom(conn, mid):
        conn.execute(DELIVERIES.insert().values(message_id=mid, channel="ch", destination="x", payload=b"p"))
        raise ProcessingError("order unknown", 204, "ORC-2")

    writer = Writer(db)
    writer.start()
    try:
        good1, bad, good2 = await asyncio.gather(
            writer.submit(unit("A", effects=queued())),
            writer.submit(unit("B", raw=b"bad", effects=boom)),
            writer.submit(unit("C", effects=queued())),
        )
    finally:
        writer.stop()
    assert (good1.status, bad.status, good2.status) == ("processed", "error", "processed")
    assert bad.answer == "ACK error 204"
    with db.connect() as conn:
        row = conn.execute(select(MESSAGES).where(MESSAGES.c.id == bad.message_id)).mappings().one()
        assert row["raw"] == b"bad" and row["error_code"] == 204 and row["error_location"] == "ORC-2"
        # the bad unit's partial delivery was rolled back with it
        dests = [r[0] for r in conn.execute(select(DELIVERIES.c.destination))]
        assert dests == ["d", "d"]


def test_resend_gets_original_answer_and_is_not_applied_twice(db) -> None:
    writer = Writer(db)
    applied = []

    def effects(conn, mid):
        applied.append(mid)
        return []

    first = writer.submit_sync(unit("X1", raw=b"body", effects=effects))
    again = writer.submit_sync(unit("X1", raw=b"body", effects=effects,
                                    answer=lambda s, e: "a different answer"))
    assert again.status == MessageStatus.DUPLICATE
    assert again.answer == first.answer and again.duplicate_of == first.message_id
    assert applied == [first.message_id]
    reused = writer.submit_sync(unit("X1", raw=b"another body", effects=effects))
    assert reused.status == MessageStatus.PROCESSED and reused.flags == "control-id-reused"
    assert len(applied) == 2


def test_queue_keeps_order_per_key_and_retries_then_dies(db) -> None:
    writer = Writer(db)
    for i in range(3):
        writer.submit_sync(unit(f"K{i}", effects=queued(key="patient-1")))
    writer.submit_sync(unit("OTHER", effects=queued(key="patient-2")))
    first = queue.claim(db, "ch")
    assert [d.ordering_key for d in first] == ["patient-1", "patient-2"]
    assert queue.claim(db, "ch") == []  # the heads are in flight; nothing behind them is eligible
    policy = queue.RetryPolicy(max_attempts=2, base=0.0, cap=0.0, jitter=0.0)
    states = queue.record(db, [queue.Attempt(first[0], ok=False, retry=True, error="AR: busy"),
                               queue.Attempt(first[1], ok=True, response="AA")], policy)
    assert states == {first[0].id: DeliveryState.PENDING, first[1].id: DeliveryState.DONE}
    again = queue.claim(db, "ch")
    assert [d.id for d in again] == [first[0].id]  # the same head again, not the one behind it
    states = queue.record(db, [queue.Attempt(again[0], ok=False, retry=True, error="AR: busy")], policy)
    assert states[again[0].id] == DeliveryState.DEAD
    nxt = queue.claim(db, "ch")
    assert len(nxt) == 1 and nxt[0].id > first[0].id  # a dead head no longer blocks its key
    assert queue.revive(db, first[0].message_id) == 1


def test_a_lapsed_claim_is_taken_over_and_the_late_result_discarded(db) -> None:
    writer = Writer(db)
    writer.submit_sync(unit("S1", effects=queued()))
    (d,) = queue.claim(db, "ch", owner=queue.Owner("node-a", timedelta(seconds=-1)))  # lapses at once
    (again,) = queue.claim(db, "ch", owner=queue.Owner("node-b", timedelta(minutes=5)))
    assert again.id == d.id and again.claimed_by == "node-b" and again.claims == d.claims + 1
    assert again.resent == "resent: lease of node node-a lapsed"
    assert queue.claim(db, "ch", owner=queue.Owner("node-a")) == []  # node-b's live lease holds it
    policy = queue.RetryPolicy()
    assert queue.record(db, [queue.Attempt(d, ok=True, response="late")], policy) == {d.id: queue.DISCARDED}
    assert queue.record(db, [queue.Attempt(again, ok=True, response="AA")], policy) == {d.id: DeliveryState.DONE}
    (row,) = queue.deliveries_for(db, d.message_id, payloads=False)
    assert (row["response"], row["attempts"], row["resent"]) == ("AA", 1, "resent: lease of node node-a lapsed")


def test_a_renewed_claim_is_not_taken_over(db) -> None:
    writer = Writer(db)
    writer.submit_sync(unit("S2", effects=queued()))
    short = queue.Owner("node-a", timedelta(seconds=-1))
    (d,) = queue.claim(db, "ch", owner=short)
    assert queue.renew(db, [d.id], queue.Owner("node-b", timedelta(minutes=5))) == 0  # not node-b's claim
    assert queue.renew(db, [d.id], queue.Owner("node-a", timedelta(minutes=5))) == 1
    assert queue.claim(db, "ch", owner=queue.Owner("node-b")) == []


def test_retry_policy_caps_and_gives_up() -> None:
    p = queue.RetryPolicy(max_attempts=5, base=1, cap=10, jitter=0.0)
    assert [p.decide(n) for n in range(1, 6)] == [1, 2, 4, 8, None]
    assert queue.RetryPolicy(max_attempts=50, base=1, cap=10, jitter=0).decide(20) == 10


def test_a_store_from_before_the_warnings_column_gets_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy

    from engine.store.db import init_db, make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = make_engine(url)
    init_db(db)
    db.dispose()
    old = sqlalchemy.create_engine(url)
    with old.begin() as conn:  # the messages table as an earlier version made it: no `warnings`
        conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN warnings")
        conn.exec_driver_sql("INSERT INTO messages (channel, sender, control_id, message_type, patient_id, body_hash,"
                             " raw, received_at, status, flags, error, error_location, ack)"
                             " VALUES ('ris-orders', '', '1', '', '', '', x'00', '2026-11-25', 'processed', '', '', '',"
                             " '')")
    old.dispose()
    db = make_engine(url)
    init_db(db)
    with db.connect() as conn:
        assert conn.exec_driver_sql("SELECT warnings FROM messages").scalar() == ""
    db.dispose()
