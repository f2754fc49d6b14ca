"""Two writers (as two engine nodes have) on one PostgreSQL store posting the same medication
resources at once: the unique key of medrec_sources and the per-patient lock decide, and neither
unit becomes an error; each resource is stored once, as a single process stores it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import func, select

from engine.runtime.destinations.base import MessageContext
from engine.runtime.destinations.medrec import MedrecDestination, MedrecDestinationConfig
from engine.store import crypto
from engine.store.db import init_db, make_engine
from engine.store.medrec import MedrecSource, MedrecSourceVersion
from engine.store.models import MessageStatus, utcnow
from engine.store.writer import QueuedPayload, UnitResult, WorkUnit, Writer
from tests.medrec.helpers import AMLODIPINE_5, dispense, request

ROOT = Path(__file__).resolve().parents[2]
CHANNEL = "emr-medications"
SOURCES = MedrecSource.__table__
VERSIONS = MedrecSourceVersion.__table__


class View:
    def __init__(self, resource: dict[str, Any]) -> None:
        self.resource = resource


@pytest.fixture
def db(store_url: str) -> Iterator[sqlalchemy.Engine]:
    crypto.configure(crypto.Keyring(None))
    eng = make_engine(store_url)
    init_db(eng)
    yield eng
    eng.dispose()


def day(days: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=days)).isoformat()


def unit(dest: MedrecDestination, control_id: str, resource: dict[str, Any]) -> WorkUnit:
    def effects(conn: Any, mid: int) -> list[QueuedPayload]:
        ctx = MessageContext(CHANNEL, b"", View(resource), resource["resourceType"], control_id, "",
                             datetime.now(UTC), message_id=mid)
        dest.apply(conn, ctx, [])
        return []

    return WorkUnit(CHANNEL, repr(resource).encode(), utcnow(), control_id=control_id,
                    message_type=resource["resourceType"], sender="EMR", effects=effects, success_answer="ok")


async def _race(db: sqlalchemy.Engine, first: list[WorkUnit], second: list[WorkUnit]) -> list[UnitResult]:
    one, two = Writer(db), Writer(db)
    one.start()
    two.start()
    try:
        a, b = await asyncio.gather(asyncio.gather(*(one.submit(u) for u in first)),
                                    asyncio.gather(*(two.submit(u) for u in second)))
    finally:
        one.stop()
        two.stop()
    return [*a, *b]


def _sources(db: sqlalchemy.Engine) -> list[Any]:
    with db.connect() as conn:
        return conn.execute(select(SOURCES.c.resource_id, SOURCES.c.patient_key)).all()


def _count(db: sqlalchemy.Engine, table: Any) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


async def test_the_same_resources_posted_on_two_nodes_at_once(db: sqlalchemy.Engine) -> None:
    dest = MedrecDestination(MedrecDestinationConfig(name="records", type="medrec"), base_dir=ROOT)
    resources = [request(f"r{i}", "active", day(10), subject={"reference": f"Patient/p{i % 5}"})
                 for i in range(100)]
    results = await _race(db, [unit(dest, f"A{i}", r) for i, r in enumerate(resources)],
                          [unit(dest, f"B{i}", r) for i, r in enumerate(resources)])
    assert [r.status for r in results] == [MessageStatus.PROCESSED] * 200, {r.error for r in results}
    assert sorted(r.resource_id for r in _sources(db)) == sorted(r["id"] for r in resources)
    assert _count(db, VERSIONS) == len(resources)  # the second post of each changed nothing


async def test_one_resource_posted_for_two_patients_at_once(db: sqlalchemy.Engine) -> None:
    """A resource that moves between patients while both versions are in flight: both units are
    processed and one row remains, under one of the two patients (whichever came last)."""
    dest = MedrecDestination(MedrecDestinationConfig(name="records", type="medrec"), base_dir=ROOT)
    first = [dispense(f"d{i}", day(5), subject={"reference": f"Patient/x{i}"}) for i in range(60)]
    second = [dispense(f"d{i}", day(5), code=AMLODIPINE_5, subject={"reference": f"Patient/y{i}"})
              for i in range(60)]
    results = await _race(db, [unit(dest, f"A{i}", r) for i, r in enumerate(first)],
                          [unit(dest, f"B{i}", r) for i, r in enumerate(second)])
    assert [r.status for r in results] == [MessageStatus.PROCESSED] * 120, {str(r.error) for r in results}
    rows = _sources(db)
    assert sorted(r.resource_id for r in rows) == sorted(r["id"] for r in first)
    assert _count(db, VERSIONS) == 120


def test_a_deadlock_raised_by_the_driver_itself_is_contention_not_an_error() -> None:
    """The medication store takes its locks on the raw driver connection, so a deadlock there is
    psycopg's own error, not SQLAlchemy's wrapper: it too must make the writer try again."""
    import psycopg.errors
    from sqlalchemy.exc import OperationalError

    from engine.store.writer import _is_contention

    raw = psycopg.errors.DeadlockDetected("deadlock detected")
    assert _is_contention(raw)
    assert _is_contention(OperationalError("SELECT 1", {}, raw))
    assert not _is_contention(psycopg.errors.UniqueViolation("duplicate key"))
