"""The C-FIND read engine (`engine.store.db.make_read_engine`): never queued behind the writer, never writes."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from wl_helpers import make_item

from engine.dicom.query import find
from engine.store.db import make_engine, make_read_engine
from engine.store.worklist import insert_item


def test_sqlite_file_gets_one_read_only_sibling(sqlite_engine: Engine) -> None:
    reader = make_read_engine(sqlite_engine)
    assert reader is not sqlite_engine
    assert make_read_engine(sqlite_engine) is reader
    assert make_read_engine(reader) is reader  # already a reader: no reader of a reader
    with reader.connect() as conn, pytest.raises(OperationalError, match="readonly"):
        conn.execute(text("DELETE FROM worklist_items"))


def test_reads_while_the_writer_holds_the_lock(sqlite_engine: Engine) -> None:
    with sqlite_engine.begin() as conn:
        insert_item(conn, make_item(PatientID="P1", AccessionNumber="ACC1"))
    query = Dataset()
    query.PatientID = ""
    query.AccessionNumber = "ACC1"
    with sqlite_engine.begin() as writer:  # BEGIN IMMEDIATE: the write lock is held until the block ends
        insert_item(writer, make_item(PatientID="P2", AccessionNumber="ACC1"))
        answers = list(find(sqlite_engine, query))
    assert [a.PatientID for a in answers] == ["P1"]  # the committed snapshot, at once


def test_other_databases_read_on_the_store_engine(any_engine: Engine) -> None:
    if any_engine.url.get_backend_name() == "sqlite":
        memory = make_engine("sqlite://")
        assert make_read_engine(memory) is memory
        memory.dispose()
    else:
        assert make_read_engine(any_engine) is any_engine
