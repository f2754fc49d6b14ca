"""Fixtures for the order corpus tests: a worklist table on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from engine.store.db import make_engine
from engine.store.worklist import WorklistItem


@pytest.fixture
def worklist_db(db_url: str) -> Iterator[Engine]:
    """A fresh database holding only the worklist table (SQLite file; PostgreSQL schema when reachable)."""
    engine = make_engine(db_url)
    WorklistItem.__table__.create(engine)  # type: ignore[attr-defined]
    yield engine
    engine.dispose()
