"""A configuration with `study_to` set (the PACS helper adds the real imagingstudy destination; a
file destination stands in): runs one scheduled COMPLETED MPPS (6 instances), a poll FOUND for
that study with those 6, one with 7 (a series added later), one for a study without MPPS, and
returns the study payloads (C3) queued for `studies`, in order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select

from engine.dicom.adapter import envelope
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store import crypto
from engine.store.models import Delivery
from tests.conftest import ROOT, engine_env
from tests.mpps.conftest import Order, n_create, n_set

DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]

CHANNEL = """\
name: pacs-studies
source: {type: dicom}
input: dicom
accept: [MPPS^N-CREATE, MPPS^N-SET, STUDY^FOUND]
destinations:
  - {name: steps, type: steps, study_to: studies}
  - {name: studies, type: file, directory: studies, content: mapped}  # takes no raw unit: only what steps emits
"""


def found(study_uid: str, accession: str, patient: str, count: int) -> bytes:
    ds = Dataset()
    ds.StudyInstanceUID, ds.AccessionNumber, ds.PatientID = study_uid, accession, patient
    ds.PatientName, ds.StudyDate, ds.StudyTime = "Doe^Jane", "20261125", "101600"
    ds.ModalitiesInStudy, ds.NumberOfStudyRelatedInstances = "CT", count
    return envelope("FOUND", "", study_uid, "", "ENGINE", ds)


async def run_study_to(tmp_path: Path, channel: str = CHANNEL) -> list[dict[str, Any]]:
    base = tmp_path / "cfg"
    (base / "channels").mkdir(parents=True)
    shutil.copy(ROOT / "engine.yaml", base / "engine.yaml")
    shutil.copy(ROOT / "channels" / "ris-orders.yaml", base / "channels" / "ris-orders.yaml")
    (base / "channels" / "pacs-studies.yaml").write_text(channel)
    (base / "mappings").symlink_to(ROOT / "mappings")
    registry = default_registry()
    app = EngineApp(load_config(base / "engine.yaml", registry, env=engine_env(tmp_path)), registry)
    await app.start()
    try:
        order = Order()
        await order.place(app)
        uid = order.mpps_uid()
        assert (await n_create(app, order.n_create(), uid)).Status == 0
        assert (await n_set(app, order.completed(), uid)).Status == 0
        pipeline = app.channels["pacs-studies"].pipeline
        again = await pipeline.receive(found(order.study_uid, order.accession, order.patient, 6))
        assert again.status == "processed"
        grown = await pipeline.receive(found(order.study_uid, order.accession, order.patient, 7))
        assert grown.status == "processed"  # a series added after the MPPS: reported by the poll
        other = Order()
        alone = await pipeline.receive(found(other.study_uid, other.accession, other.patient, 4))
        assert alone.status == "processed"
        assert app.db is not None
        with app.db.connect() as conn:
            rows = conn.execute(
                select(DELIVERIES.c.payload, DELIVERIES.c.ordering_key).where(
                    DELIVERIES.c.destination == "studies", DELIVERIES.c.content_type == "application/json"
                ).order_by(DELIVERIES.c.id)
            ).all()
            raw_units = conn.execute(
                select(DELIVERIES.c.id).where(
                    DELIVERIES.c.destination == "studies", DELIVERIES.c.content_type == "application/dicom+json"
                )
            ).all()
        if "content: raw" in channel:  # a destination that takes the raw unit gets it too (C2)
            assert len(raw_units) == 5, raw_units  # N-CREATE, N-SET and three FOUND
        else:
            assert raw_units == []
        payloads = [json.loads(crypto.open_value(r[0], crypto.PAYLOAD)) for r in rows]
        keys = [f"study:{order.study_uid}", f"study:{order.study_uid}", f"study:{other.study_uid}"]
        assert [r[1] for r in rows] == keys
        return payloads
    finally:
        await app.stop()
