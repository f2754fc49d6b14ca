"""The database as the judge: two writers (each its own connection, as two processes have) storing
the same messages at once; the store lock, the leader lease, and the dedupe keys of an older store."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import select

from engine.store import nodes
from engine.store.db import init_db, make_engine
from engine.store.models import Message, MessageStatus, utcnow
from engine.store.writer import QueuedPayload, WorkUnit, Writer

MESSAGES = Message.__table__


@pytest.fixture
def db(store_url: str):
    eng = make_engine(store_url)
    init_db(eng)
    yield eng
    eng.dispose()


def unit(control_id: str, raw: bytes, applied: list[int], answer: str) -> WorkUnit:
    def effects(conn, mid: int) -> list[QueuedPayload]:
        applied.append(mid)
        return [QueuedPayload("d", raw, "k")]

    return WorkUnit("ch", raw, utcnow(), control_id=control_id, message_type="ORM^O01", sender="RIS|H",
                    effects=effects, success_answer=answer)


async def _race(db, bodies: dict[str, bytes]) -> tuple[list, list, list[int]]:
    one, two = Writer(db), Writer(db)
    one.start()
    two.start()
    applied: list[int] = []
    try:
        first = asyncio.gather(*(one.submit(unit(c, b, applied, f"ACK-1 {c}")) for c, b in bodies.items()))
        second = asyncio.gather(*(two.submit(unit(c, b, applied, f"ACK-2 {c}")) for c, b in bodies.items()))
        a, b = await asyncio.gather(first, second)
    finally:
        one.stop()
        two.stop()
    return list(a), list(b), applied


async def test_two_writers_storing_the_same_messages_apply_each_once(db) -> None:
    bodies = {f"C{i:03d}": f"MSH|body {i}".encode() for i in range(300)}
    a, b, applied = await _race(db, bodies)
    for x, y in zip(a, b, strict=True):
        assert sorted([x.status, y.status]) == [MessageStatus.DUPLICATE, MessageStatus.PROCESSED]
        original, resend = (x, y) if x.status == MessageStatus.PROCESSED else (y, x)
        assert resend.answer == original.answer and resend.duplicate_of == original.message_id
    with db.connect() as conn:
        rows = conn.execute(select(MESSAGES.c.control_id, MESSAGES.c.status, MESSAGES.c.id)).all()
        deliveries = conn.exec_driver_sql("SELECT count(*) FROM deliveries").scalar()
    assert Counter(r.control_id for r in rows if r.status == "processed") == Counter(list(bodies))
    assert deliveries == len(bodies)  # the loser's effects were rolled back with its savepoint
    processed_ids = {r.id for r in rows if r.status == "processed"}
    assert processed_ids <= set(applied)  # (a loser may have run its effects before they were undone)


async def test_one_control_id_for_two_different_messages_keeps_both(db) -> None:
    """A RIS that reuses MSH-10: both bodies are processed; the key ends on one of them."""
    one, two = Writer(db), Writer(db)
    one.start()
    two.start()
    applied: list[int] = []
    try:
        x, y = await asyncio.gather(one.submit(unit("SAME", b"first body", applied, "ACK x")),
                                    two.submit(unit("SAME", b"second body", applied, "ACK y")))
    finally:
        one.stop()
        two.stop()
    assert {x.status, y.status} == {MessageStatus.PROCESSED}
    assert sorted([x.flags, y.flags]) == ["", "control-id-reused"]
    with db.connect() as conn:
        keyed = conn.exec_driver_sql("SELECT message_id FROM dedupe_keys WHERE control_id = 'SAME'").scalar()
    assert keyed in {x.message_id, y.message_id}


def test_an_older_store_gets_its_dedupe_keys(store_url: str) -> None:
    eng = make_engine(store_url)
    init_db(eng)
    writer = Writer(eng)
    first = writer.submit_sync(unit("OLD1", b"old body", [], "ACK old"))
    writer.stop()  # its connection, before the table goes
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE dedupe_keys")  # as a store made before the table existed
    init_db(eng)
    again = writer.submit_sync(unit("OLD1", b"old body", [], "ACK new"))
    assert again.status == MessageStatus.DUPLICATE and again.answer == "ACK old"
    assert again.duplicate_of == first.message_id
    writer.stop()
    eng.dispose()


def test_the_store_lock(store_url: str, tmp_path: Path) -> None:
    sqlite = make_engine(f"sqlite:///{tmp_path / 'engine.db'}")
    pg = make_engine(store_url)
    try:
        one = nodes.StoreLock(sqlite, shared=False)
        one.acquire()
        with pytest.raises(nodes.StoreInUse, match="SQLite store"):
            nodes.StoreLock(sqlite, shared=False).acquire()
        one.release()
        again = nodes.StoreLock(sqlite, shared=False)
        again.acquire()  # free again once released
        again.release()

        members = [nodes.StoreLock(pg, shared=True) for _ in range(2)]
        for m in members:
            m.acquire()  # cluster nodes share the store
        with pytest.raises(nodes.StoreInUse, match="ENGINE_CLUSTER=true"):
            nodes.StoreLock(pg, shared=False).acquire()
        for m in members:
            m.release()
        alone = nodes.StoreLock(pg, shared=False)
        alone.acquire()
        with pytest.raises(nodes.StoreInUse, match="outside cluster mode"):
            nodes.StoreLock(pg, shared=True).acquire()
        alone.release()
    finally:
        sqlite.dispose()
        pg.dispose()


def test_the_leader_lease_moves_only_once_it_expired(db: sqlalchemy.Engine) -> None:
    assert nodes.acquire_lease(db, "job", "node-a", timedelta(minutes=1))
    assert not nodes.acquire_lease(db, "job", "node-b", timedelta(minutes=1))
    assert nodes.acquire_lease(db, "job", "node-a", timedelta(seconds=-1))  # renewed, and lapsed at once
    assert nodes.lease_holder(db, "job") is None
    assert nodes.acquire_lease(db, "job", "node-b", timedelta(minutes=1))
    holder = nodes.lease_holder(db, "job")
    assert holder is not None and holder[0] == "node-b"
