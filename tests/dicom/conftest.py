"""Fixtures for the worklist/DICOM tests: real SQLite files, and PostgreSQL in a throwaway schema."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from engine.store.db import make_engine, sqlite_url_for
from engine.store.worklist import WorklistItem

# test modules import the shared helpers (wl_helpers.py) from this folder
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url_for(tmp_path / "wl.db"))
    WorklistItem.__table__.create(engine)  # type: ignore[attr-defined]
    yield engine
    engine.dispose()


@pytest.fixture
def any_engine(db_url: str) -> Iterator[Engine]:
    """The same test on SQLite and on PostgreSQL (own schema; skipped when unreachable)."""
    engine = make_engine(db_url)
    WorklistItem.__table__.create(engine)  # type: ignore[attr-defined]
    yield engine
    engine.dispose()
