"""Two writers (as two engine nodes have) on one PostgreSQL store taking the same MPPS N-CREATE at
once: the database's unique key on the SOP instance decides, and the loser is answered as a single
process answers a second N-CREATE (the first one's answer for the same request, 0x0111 for one
that differs), never 0x0110; nothing is stored twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.dicom.adapter import envelope
from engine.dicom.mpps import MPPS_SOP_CLASS
from engine.dicom.status import DicomAnswer
from engine.inputs import Outcome
from engine.runtime.app import default_registry
from engine.runtime.config import load_config
from engine.runtime.pipeline import Pipeline
from engine.store.db import init_db, make_engine
from engine.store.models import Message, MessageStatus
from engine.store.steps import PerformedStep
from engine.store.writer import Writer
from tests.conftest import ROOT, engine_env
from tests.mpps.conftest import Order

STEPS = PerformedStep.__table__
MESSAGES = Message.__table__


class Node:
    """One node's pipelines of the shipped channels, with a writer of its own."""

    def __init__(self, tmp_path: Path, store_url: str, name: str) -> None:
        registry = default_registry()
        env = engine_env(tmp_path / name, storage_url=store_url)
        (tmp_path / name).mkdir(exist_ok=True)
        self.loaded = load_config(ROOT / "engine.yaml", registry, env=env)
        self.db = make_engine(store_url)
        init_db(self.db)
        self.writer = Writer(self.db)
        self.writer.start()
        self.pipelines = {s.config.name: Pipeline.build(s, registry, self.writer, self.loaded.base_dir)
                          for s in self.loaded.channels if s.config.name in {"ris-orders", "pacs-studies"}}

    async def mpps(self, command: str, uid: str, caller: str, ds) -> tuple[Outcome, DicomAnswer]:
        outcome = await self.pipelines["pacs-studies"].receive(envelope(command, MPPS_SOP_CLASS, uid, caller,
                                                                        "ENGINE", ds))
        return outcome, DicomAnswer.from_json(outcome.answer)

    def stop(self) -> None:
        self.writer.stop()
        self.db.dispose()


@pytest.fixture
async def two(tmp_path: Path, store_url: str) -> AsyncIterator[tuple[Node, Node]]:
    a, b = Node(tmp_path, store_url, "a"), Node(tmp_path, store_url, "b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


async def _orders(node: Node, count: int) -> list[Order]:
    orders = [Order() for _ in range(count)]
    for o in orders:
        placed = await node.pipelines["ris-orders"].receive(o.orm())
        assert placed.status == MessageStatus.PROCESSED, placed.error
    return orders


async def test_the_same_n_create_on_two_nodes_at_once(two: tuple[Node, Node]) -> None:
    a, b = two
    orders = await _orders(a, 20)
    same = [asyncio.gather(a.mpps("N-CREATE", o.mpps_uid(), "CT1", o.n_create()),
                           b.mpps("N-CREATE", o.mpps_uid(), "CT1", o.n_create())) for o in orders]
    for (x, ax), (y, ay) in await asyncio.gather(*same):
        assert sorted([x.status, y.status]) == [MessageStatus.DUPLICATE, MessageStatus.PROCESSED]
        assert ax.status == ay.status == 0x0000
        assert x.answer == y.answer  # the duplicate gets the first one's stored answer
    with a.db.connect() as conn:
        uids = conn.execute(select(STEPS.c.sop_instance_uid)).scalars().all()
        told = conn.exec_driver_sql("SELECT count(*) FROM deliveries WHERE destination = 'ris'").scalar()
    assert sorted(uids) == sorted(o.mpps_uid() for o in orders)
    assert told == len(orders)


async def test_two_different_n_creates_for_one_instance_at_once(two: tuple[Node, Node]) -> None:
    """Two modalities (or one that changed its request) naming one SOP instance: one is created,
    the other is refused 0x0111 and kept as an error, as a single process refuses the second."""
    a, b = two
    orders = await _orders(a, 20)
    racing = [asyncio.gather(a.mpps("N-CREATE", o.mpps_uid(), "CT1", o.n_create()),
                             b.mpps("N-CREATE", o.mpps_uid(), "CT2", o.n_create(StudyID="OTHER")))
              for o in orders]
    for (x, ax), (y, ay) in await asyncio.gather(*racing):
        assert sorted([ax.status, ay.status]) == [0x0000, 0x0111], (ax, ay)
        loser = x if ax.status else y
        assert loser.status == MessageStatus.ERROR and "already exists" in str(loser.error)
    with a.db.connect() as conn:
        uids = conn.execute(select(STEPS.c.sop_instance_uid)).scalars().all()
        creates = conn.execute(select(MESSAGES.c.status).where(MESSAGES.c.message_type == "MPPS^N-CREATE")).all()
        told = conn.exec_driver_sql("SELECT count(*) FROM deliveries WHERE destination = 'ris'").scalar()
    assert sorted(uids) == sorted(o.mpps_uid() for o in orders)
    assert told == len(orders)  # one IN PROGRESS status per order: the loser's was rolled back
    assert sorted(r.status for r in creates).count("processed") == len(orders)


async def test_two_final_n_sets_of_one_step_at_once(two: tuple[Node, Node]) -> None:
    """COMPLETED on one node, a different COMPLETED on the other: the step row is locked, so the
    second sees the first's final status and is refused A710, as a single process refuses it."""
    a, b = two
    orders = await _orders(a, 10)
    for o in orders:
        created, answer = await a.mpps("N-CREATE", o.mpps_uid(), "CT1", o.n_create())
        assert answer.status == 0, created.error
    racing = [asyncio.gather(a.mpps("N-SET", o.mpps_uid(), "CT1", o.completed(series=1)),
                             b.mpps("N-SET", o.mpps_uid(), "CT1", o.completed(series=2)))
              for o in orders]
    for (_, ax), (_, ay) in await asyncio.gather(*racing):
        assert sorted([ax.status, ay.status]) == [0x0000, 0x0110], (ax, ay)
        assert 0xA710 in (ax.error_id, ay.error_id)
    with a.db.connect() as conn:
        statuses = conn.execute(select(STEPS.c.status)).scalars().all()
    assert statuses == ["COMPLETED"] * len(orders)
