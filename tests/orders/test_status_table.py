"""The order status table (ORC-1 + ORC-5 -> step status) with ORC-5 left empty, as most RIS send it."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select

from engine.errors import ProcessingError
from engine.runtime.destinations.base import MessageContext
from engine.runtime.destinations.worklist import (
    DEFAULT_STATUS_MAP,
    WorklistDestination,
    WorklistDestinationConfig,
    step_status,
)
from engine.store.worklist import WorklistItem

T = WorklistItem.__table__  # type: ignore[attr-defined]


def item(**sps: str) -> dict[str, Any]:
    step = {
        "Modality": "CT",
        "ScheduledStationAETitle": "CT1",
        "ScheduledProcedureStepStartDate": "20261125",
        "ScheduledProcedureStepStartTime": "093000",
        "ScheduledProcedureStepID": "SPS1",
    } | sps
    return {
        "PatientID": "P1",
        "IssuerOfPatientID": "HOSP",
        "PatientName": "Doe^John",
        "PlacerOrderNumberImagingServiceRequest": "PL1",
        "FillerOrderNumberImagingServiceRequest": "FI1",
        "AccessionNumber": "ACC1",
        "RequestedProcedureID": "RP1",
        "StudyInstanceUID": "1.2.826.0.1.3680043.10.1.1",
        "ScheduledProcedureStepSequence": [step],
    }


def order(oc: str, os_: str = "", **sps: str) -> dict[str, Any]:
    return {"control": {"order_control": oc, "order_status": os_}, "dataset": item(**sps)}


def destination(**config: Any) -> WorklistDestination:
    return WorklistDestination(WorklistDestinationConfig(name="wl", type="worklist", **config))


def context() -> MessageContext:
    """A context by field name (the pipeline rewrite renames `message` to `view`, adds `patient_id`)."""
    values: dict[str, Any] = {
        "channel": "ris-orders", "raw": b"", "message": None, "view": None, "message_type": "ORM^O01",
        "control_id": "MSG1", "patient_id": "P1", "received_at": datetime(2026, 11, 1, tzinfo=UTC),
    }
    names = {f.name for f in dataclasses.fields(MessageContext) if f.init}
    return MessageContext(**{k: v for k, v in values.items() if k in names})


def apply(db: Engine, *outputs: dict[str, Any], dest: WorklistDestination | None = None) -> None:
    ctx = context()
    with db.begin() as conn:
        (dest or destination()).apply(conn, ctx, list(outputs))


def rows(db: Engine) -> list[dict[str, Any]]:
    with db.connect() as conn:
        found = [dict(r) for r in conn.execute(select(T).order_by(T.c.id)).mappings()]
    for r in found:
        r["dataset"] = json.loads(r["dataset_json"])
    return found


@pytest.mark.parametrize(
    ("oc", "os_", "expected"),
    [
        ("NW", "", "SCHEDULED"),
        ("XO", "", "SCHEDULED"),
        ("CA", "", "CANCELLED"),
        ("DC", "", "DISCONTINUED"),
        ("NW", "SC", "SCHEDULED"),  # a pair still wins
        ("XO", "CM", "COMPLETED"),
        ("DC", "CA", "DISCONTINUED"),
        ("NW", "CM", None),  # a sent ORC-5 without a pair contradicts ORC-1: refused, not guessed
        ("XO", "CA", None),
        ("SC", "", None),  # ORC-1 codes without an entry stay refused
        ("OK", "", None),
    ],
)
def test_lookup_pair_then_order_control_alone(oc: str, os_: str, expected: str | None) -> None:
    assert step_status(DEFAULT_STATUS_MAP, oc, os_) == expected


def test_new_order_with_empty_orc5_creates_a_scheduled_item(worklist_db: Engine) -> None:
    apply(worklist_db, order("NW"))
    [row] = rows(worklist_db)
    assert row["status"] == "SCHEDULED" and row["accession_number"] == "ACC1"


def test_change_order_with_empty_orc5_updates_the_item(worklist_db: Engine) -> None:
    apply(worklist_db, order("NW"))
    apply(worklist_db, order("XO", ScheduledStationAETitle="CT2", ScheduledProcedureStepStartTime="141500"))
    [row] = rows(worklist_db)
    assert row["status"] == "SCHEDULED"
    assert row["station_aet"] == "CT2" and row["sps_start"] == "20261125141500"


@pytest.mark.parametrize(("oc", "status"), [("CA", "CANCELLED"), ("DC", "DISCONTINUED")])
def test_cancel_and_discontinue_with_empty_orc5(worklist_db: Engine, oc: str, status: str) -> None:
    apply(worklist_db, order("NW"))
    apply(worklist_db, order(oc))
    [row] = rows(worklist_db)
    assert row["status"] == status


def test_contradicting_pair_is_refused_and_changes_nothing(worklist_db: Engine) -> None:
    apply(worklist_db, order("NW"))
    with pytest.raises(ProcessingError) as err:
        apply(worklist_db, order("NW", "CM", ScheduledStationAETitle="CT9"))
    assert err.value.code == 103 and err.value.location == "ORC-1"
    assert rows(worklist_db)[0]["station_aet"] == "CT1"


def test_order_control_entries_are_configuration(worklist_db: Engine) -> None:
    """A site that wants ORC-5 always sent drops the ORC-1-alone entries from status_map."""
    pairs_only = {k: v for k, v in DEFAULT_STATUS_MAP.items() if "_" in k}
    with pytest.raises(ProcessingError) as err:
        apply(worklist_db, order("NW"), dest=destination(status_map=pairs_only))
    assert err.value.code == 103 and err.value.location == "ORC-1"
    assert rows(worklist_db) == []
    dest = destination(status_map={"nw": "SCHEDULED"})  # keys are upper-cased like the pairs
    apply(worklist_db, order("NW"), dest=dest)
    assert rows(worklist_db)[0]["status"] == "SCHEDULED"
