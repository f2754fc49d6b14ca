"""Two `engine run` processes on one PostgreSQL store (cluster mode): effects once, claims owned,
per-key order across nodes, one leader; and a second process refused outside cluster mode."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path

import sqlalchemy

from engine.hl7.mllp import MLLPClient
from tests.cluster.conftest import LEASE, orm, wait_for


async def _send_all(port: int, bodies: list[bytes], connections: int = 4) -> list[bytes]:
    """Send every body over `connections` connections; the replies in the bodies' order."""
    replies: list[bytes] = [b""] * len(bodies)
    todo = list(enumerate(bodies))

    async def worker() -> None:
        async with MLLPClient("127.0.0.1", port, read_timeout=120) as client:
            while todo:
                i, body = todo.pop(0)
                replies[i] = await client.send(body)

    await asyncio.gather(*(worker() for _ in range(connections)))
    return replies


def _msa(reply: bytes) -> str:
    seg = [s for s in reply.split(b"\r") if s.startswith(b"MSA|")][0].decode()
    return seg.split("|")[1]


def _deliveries(store: sqlalchemy.Engine, channel: str) -> list[dict]:
    with store.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT d.id, d.state, d.claims, d.resent, d.claimed_by, m.control_id FROM deliveries d"
            " JOIN messages m ON m.id = d.message_id WHERE d.channel = %s ORDER BY d.id", (channel,)
        ).mappings().all()
    return [dict(r) for r in rows]


def test_the_same_orders_sent_to_both_nodes_at_once_are_applied_once(nodes, store, tmp_path: Path) -> None:
    a, b = nodes("node-a").start(), nodes("node-b").start()
    bodies = [orm(f"RACE{i:03d}", f"ACC{i:03d}", patient=f"P{i % 17}") for i in range(120)]

    async def race() -> tuple[list[bytes], list[bytes]]:
        return tuple(await asyncio.gather(_send_all(a.orders_port, bodies), _send_all(b.orders_port, bodies)))  # type: ignore[return-value]

    first, second = asyncio.run(race())
    assert [_msa(r) for r in first] == ["AA"] * len(bodies)
    assert first == second  # the second writer answers with the first one's stored ACK, byte for byte

    with store.connect() as conn:
        per_accession = dict(conn.exec_driver_sql(
            "SELECT accession_number, count(*) FROM worklist_items GROUP BY accession_number").all())
        statuses = conn.exec_driver_sql(
            "SELECT control_id, status FROM messages WHERE channel = 'ris-orders'").all()
    assert per_accession == {f"ACC{i:03d}": 1 for i in range(120)}
    processed = Counter(cid for cid, status in statuses if status == "processed")
    duplicates = Counter(cid for cid, status in statuses if status == "duplicate")
    assert processed == Counter({f"RACE{i:03d}": 1 for i in range(120)})
    assert duplicates == processed  # every resend stored, as a duplicate of the one that went through
    # the archive (a queued file destination, shared folder) holds each processed message once
    assert wait_for(lambda: len(list((tmp_path / "archive").glob("*.hl7"))) == 120)
    assert all(d["state"] == "done" for d in _deliveries(store, "ris-orders"))


def test_two_nws_for_one_order_at_two_nodes_make_one_item(nodes, store) -> None:
    """Different MSH-10s, the same order: the order's identity is unique, the second NW updates it."""
    a, b = nodes("node-a").start(), nodes("node-b").start()
    left = [orm(f"L{i:03d}", f"ORD{i:03d}") for i in range(60)]
    right = [orm(f"R{i:03d}", f"ORD{i:03d}") for i in range(60)]

    async def race() -> tuple[list[bytes], list[bytes]]:
        return tuple(await asyncio.gather(_send_all(a.orders_port, left), _send_all(b.orders_port, right)))  # type: ignore[return-value]

    got_a, got_b = asyncio.run(race())
    assert {_msa(r) for r in got_a + got_b} == {"AA"}
    with store.connect() as conn:
        counts = dict(conn.exec_driver_sql(
            "SELECT accession_number, count(*) FROM worklist_items GROUP BY accession_number").all())
    assert counts == {f"ORD{i:03d}": 1 for i in range(60)}


def test_a_slow_receiver_gets_each_message_once_and_in_patient_order(nodes, store, receiver) -> None:
    """0.2 s per ACK: a node's group of claims (one head per patient, 30 patients) is out about
    twice as long as a lease (3 s); renewed, no other node takes it. Messages for a patient sent
    alternately to both nodes arrive in the order they were sent."""
    rcv = receiver(0.2)
    a = nodes("node-a", receiver_port=rcv.port).start()
    b = nodes("node-b", receiver_port=rcv.port).start()
    patients = [f"PT{p:02d}" for p in range(30)]
    sent: dict[str, list[str]] = defaultdict(list)

    async def send_in_turn() -> None:
        clients = [MLLPClient("127.0.0.1", n.forward_port, read_timeout=60) for n in (a, b)]
        try:
            for i in range(3):
                for k, p in enumerate(patients):
                    cid = f"{p}-{i:02d}"
                    reply = await clients[(i + k) % 2].send(orm(cid, f"X{cid}", patient=p))  # in turn per patient
                    assert _msa(reply) == "AA"
                    sent[p].append(cid)
        finally:
            for c in clients:
                await c.close()

    asyncio.run(send_in_turn())
    total = sum(len(v) for v in sent.values())
    assert wait_for(lambda: len(rcv.control_ids()) >= total, timeout=180)
    assert wait_for(lambda: all(d["state"] == "done" for d in _deliveries(store, "forward")), timeout=60)
    got = rcv.control_ids()
    assert Counter(got) == Counter(cid for v in sent.values() for cid in v)  # no duplicate while both live
    for p in patients:
        assert [r.control_id for r in rcv.got if r.patient == p] == sent[p]
    deliveries = _deliveries(store, "forward")
    assert {d["claims"] for d in deliveries} == {1} and {d["resent"] for d in deliveries} == {""}
    assert {d["claimed_by"] for d in deliveries} <= {"node-a", "node-b"}


def test_kill_9_of_the_node_holding_claims(nodes, store, receiver) -> None:
    """The live node finishes the dead node's claims once their lease lapses; the few it sends
    again are marked re-sent, and are the only duplicates the receiver sees."""
    rcv = receiver(0.2)
    a = nodes("node-a", receiver_port=rcv.port).start()
    bodies = [orm(f"K{i:03d}", f"KA{i:03d}", patient=f"KP{i % 8}") for i in range(80)]
    asyncio.run(_send_all(a.forward_port, bodies))  # node a alone: every claim is a's
    assert wait_for(lambda: len(rcv.control_ids()) >= 3, timeout=60)
    b = nodes("node-b", receiver_port=rcv.port).start()
    with store.connect() as conn:
        held = conn.exec_driver_sql(
            "SELECT count(*) FROM deliveries WHERE state = 'doing' AND claimed_by = 'node-a'").scalar()
    assert held
    a.kill()
    time.sleep(0.5)  # frames a sent before it died are read by the receiver's thread
    killed_with = set(rcv.control_ids())

    assert wait_for(lambda: all(d["state"] == "done" for d in _deliveries(store, "forward")), timeout=LEASE + 120)
    got = Counter(rcv.control_ids())
    assert set(got) == {f"K{i:03d}" for i in range(80)}  # nothing lost
    twice = {cid for cid, n in got.items() if n > 1}
    deliveries = _deliveries(store, "forward")
    resent = {d["control_id"] for d in deliveries if d["resent"] == "resent: lease of node node-a lapsed"}
    assert resent and twice <= resent & killed_with  # each duplicate is a delivery marked as re-sent
    assert {d["claimed_by"] for d in deliveries if d["control_id"] in resent} == {"node-b"}

    shown = b.cli("messages", "show", str(_message_id(store, sorted(resent)[0])))
    assert shown.returncode == 0, shown.stderr
    assert "resent: lease of node node-a lapsed" in shown.stdout
    status = b.cli("status")
    assert status.returncode == 0, status.stderr
    assert "node-b" in status.stdout and "leader: node-b" in status.stdout


def _message_id(store: sqlalchemy.Engine, control_id: str) -> int:
    with store.connect() as conn:
        return int(conn.exec_driver_sql("SELECT id FROM messages WHERE control_id = %s AND status = 'processed'",
                                        (control_id,)).scalar_one())


def test_the_purge_runs_on_the_leader_only_and_moves_when_it_dies(nodes, store) -> None:
    runs = "job worklist-purge runs on node"
    a = nodes("node-a", purge_minutes=0.02).start()  # every 1.2 s
    assert wait_for(lambda: "node node-a is now the leader" in a.log_text(), timeout=30)
    b = nodes("node-b", purge_minutes=0.02).start()
    assert wait_for(lambda: a.log_text().count(runs) >= 4, timeout=60)
    assert runs not in b.log_text()
    status = b.cli("status")
    assert "leader: node-a" in status.stdout and "node-b" in status.stdout, status.stdout + status.stderr
    for name in ("node-a", "node-b"):
        assert name in status.stdout

    a.kill()
    assert wait_for(lambda: b.log_text().count(runs) >= 2, timeout=LEASE + 60)
    assert "node node-b is now the leader" in b.log_text()
    assert "leader: node-b" in b.cli("status").stdout


def test_a_second_process_is_refused_without_cluster_mode(nodes, store_url: str, tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path / 'engine.db'}"
    for url in (sqlite, store_url):
        first = nodes(f"one-{len(url)}", cluster=False, storage_url=url).start()
        second = nodes(f"two-{len(url)}", cluster=False, storage_url=url)
        assert second.spawn().wait(timeout=120) == 1
        assert "another engine process is using" in second.log_text()
        if url == store_url:  # a cluster node does not join a store a lone process holds
            joiner = nodes(f"three-{len(url)}", cluster=True, storage_url=url)
            assert joiner.spawn().wait(timeout=120) == 1
            assert "outside cluster mode" in joiner.log_text()
        first.stop()
    on_sqlite = nodes("sqlite-cluster", cluster=True, storage_url=sqlite)
    assert on_sqlite.spawn().wait(timeout=120) == 1
    assert "needs a PostgreSQL store" in on_sqlite.log_text()
