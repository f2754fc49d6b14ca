"""`engine status`: the nodes on the store, their heartbeat and claims, and the leader."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert

from engine.store import nodes
from tests.cli.conftest import DELIVERIES, Cli


def test_status_without_a_running_engine(cli: Cli) -> None:
    out = cli("status").stdout
    assert "no engine node has registered on this store" in out
    assert "leader: none" in out


def test_status_lists_nodes_claims_and_the_leader(cli: Cli) -> None:
    db = cli.db
    nodes.register(db, "node-a", host="ris-gw1", pid=4242, cluster=True, stale_after=timedelta(seconds=30))
    nodes.set_listeners(db, "node-a", ["ris-orders mllp://0.0.0.0:2575"])
    assert nodes.acquire_lease(db, nodes.LEADER, "node-a", timedelta(minutes=1))
    mid = cli.add_message(control_id="C1")
    with db.begin() as conn:  # a claim left by a node that is gone
        conn.execute(insert(DELIVERIES).values(message_id=mid, channel="ris-orders", destination="archive",
                                               state="doing", payload=b"x", claimed_by="node-gone", claims=1))
    out = cli.flat(cli("status").stdout)
    assert "node-a" in out and "ris-gw1" in out and "cluster" in out
    assert "ris-orders mllp://0.0.0.0:2575" in out
    assert "1 deliveries in flight under node-gone, which is not running" in out
    assert "leader: node-a" in out
