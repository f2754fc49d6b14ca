"""Fixtures for the worklist/DICOM tests: real SQLite files, and PostgreSQL in a throwaway schema."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from engine.store.db import make_engine, sqlite_url_for
from engine.store.worklist import WorklistItem

# test modules import the shared helpers (wl_helpers.py) from this folder
sys.path.insert(0, str(Path(__file__).parent))

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url_for(tmp_path / "wl.db"))
    WorklistItem.__table__.create(engine)  # type: ignore[attr-defined]
    yield engine
    engine.dispose()


def _pg_reachable() -> str | None:
    try:
        probe = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with probe.connect() as conn:
            conn.execute(text("select 1"))
        probe.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "skip"
        return f"PostgreSQL at 127.0.0.1:5432 unreachable: {type(exc).__name__}"


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    schema = f"wl_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(PG_URL)
    engine = engine.execution_options(schema_translate_map=None)
    from sqlalchemy import event

    @event.listens_for(engine.engine, "connect")
    def _search_path(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute(f'SET search_path TO "{schema}"')
        dbapi_conn.commit()

    WorklistItem.__table__.create(engine)  # type: ignore[attr-defined]
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_engine(request: pytest.FixtureRequest) -> Engine:
    """The same test on SQLite and on PostgreSQL (skipped when unreachable)."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_engine")
    return request.getfixturevalue("sqlite_engine")
