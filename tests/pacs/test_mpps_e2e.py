"""The whole path with real parts: the RIS order over MLLP -> worklist; the modality's MPPS N-CREATE
and N-SET COMPLETED at the engine's SCP (pynetdicom); the images reaching Orthanc only afterwards;
the `pacs-studies` channel's `steps` destination queues the study payload (C2/C3), the
`imagingstudy` destination defers until Orthanc holds the images, then writes the ImagingStudy to
sekmet. Then the engine's own PACS poll job finds a study that came without MPPS."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import select

pytest.importorskip("engine.dicom.adapter", reason="needs the MPPS part (h-mpps): dicom adapter, steps")

from engine.runtime.app import EngineApp, default_registry  # noqa: E402
from engine.runtime.config import load_config  # noqa: E402
from engine.store import crypto  # noqa: E402
from engine.store.models import Delivery  # noqa: E402
from tests.conftest import ROOT, engine_env  # noqa: E402

mpps_kit = pytest.importorskip("tests.mpps.conftest")  # the modality (pynetdicom MPPS SCU) and the RIS order
Order, n_create, n_set = mpps_kit.Order, mpps_kit.n_create, mpps_kit.n_set

DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
SYSTEMS = {"accession": "urn:oid:1.2.3.4.5.11", "mrn": "urn:oid:1.2.3.4.5.1", "placer": "urn:oid:1.2.3.4.5.3"}

CHANNEL = """\
name: pacs-studies
source: {{type: dicom}}
input: dicom
accept: [MPPS^N-CREATE, MPPS^N-SET, STUDY^FOUND]
destinations:
  - {{name: steps, type: steps, study_to: imagingstudy}}
  - name: imagingstudy
    type: imagingstudy
    base_url: {emr}
    identifier_systems: {systems}
    pacs: {{host: 127.0.0.1, port: {port}, aet: ORTHANC}}
    wait_minutes: 10
    defer_seconds: 0.3
"""


def studies_on(emr: Any, study_uid: str) -> list[dict[str, Any]]:
    return emr.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")


async def eventually(check: Any, what: str, timeout: float = 90) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await asyncio.to_thread(check)
        if found:
            return found
        assert loop.time() < deadline, what
        await asyncio.sleep(0.2)


def study_deliveries(app: EngineApp) -> list[Any]:
    assert app.db is not None
    with app.db.connect() as conn:
        return list(conn.execute(select(DELIVERIES).where(DELIVERIES.c.destination == "imagingstudy")
                                 .order_by(DELIVERIES.c.id)).all())


async def test_mpps_completed_then_images_then_poll(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    base = tmp_path / "cfg"
    (base / "channels").mkdir(parents=True)
    shutil.copy(ROOT / "engine.yaml", base / "engine.yaml")
    shutil.copy(ROOT / "channels" / "ris-orders.yaml", base / "channels" / "ris-orders.yaml")
    (base / "channels" / "pacs-studies.yaml").write_text(
        CHANNEL.format(emr=emr.base_url, systems=json.dumps(SYSTEMS), port=orthanc.dicom_port))
    (base / "mappings").symlink_to(ROOT / "mappings")
    env = engine_env(tmp_path)
    env.update({"PACS_HOST": "127.0.0.1", "PACS_PORT": str(orthanc.dicom_port), "PACS_AET": "ORTHANC",
                "PACS_POLL_MINUTES": "60"})  # the job is there; the test runs it rather than wait an hour
    registry = default_registry()
    app = EngineApp(load_config(base / "engine.yaml", registry, env=env), registry)
    await app.start()
    try:
        order = Order()
        await order.place(app)
        mpps = order.mpps_uid()
        assert (await n_create(app, order.n_create(), mpps)).Status == 0
        assert (await n_set(app, order.completed(series=2, instances=3), mpps)).Status == 0
        # the images are not in the PACS yet: the delivery waits, spending no attempt
        [waiting] = await eventually(
            lambda: [d for d in study_deliveries(app) if "waiting for images" in d.response], "no deferral")
        assert waiting.attempts == 0 and not studies_on(emr, order.study_uid)
        today = datetime.now(UTC).strftime("%Y%m%d")  # the poll below finds this study too
        plan = kit.StudyPlan(order.accession, order.patient, uid=order.study_uid, study_date=today, series=[
            kit.SeriesPlan("CT", 3, number=s, uid=f"{order.study_uid}.{s}",
                           instance_uids=[f"{order.study_uid}.{s}.{i}" for i in (1, 2, 3)]) for s in (1, 2)])
        orthanc.store_all(plan.datasets())
        [found] = await eventually(lambda: studies_on(emr, order.study_uid), "no ImagingStudy from the MPPS")
        assert found["numberOfSeries"] == 2 and found["numberOfInstances"] == 6
        assert found["basedOn"][0]["identifier"] == {"system": SYSTEMS["placer"], "value": order.placer}
        assert found["series"][0]["performer"] == [{"actor": {"display": "Tina Tech"}}]
        [done] = await eventually(lambda: [d for d in study_deliveries(app) if d.state == "done"], "not done")
        assert done.attempts == 1

        # a study the PACS got without any MPPS: the engine's poll job finds it
        tag = uuid.uuid4().hex[:8]
        alone = kit.StudyPlan(f"A{tag}", f"P{tag}", study_date=today)
        orthanc.store_all(alone.datasets())
        job = app.scheduler.get_job("pacs-poll")
        assert job is not None
        await job.func()
        [polled] = await eventually(lambda: studies_on(emr, alone.uid), "no ImagingStudy from the poll")
        assert polled["numberOfInstances"] == 3 and polled["subject"]["identifier"]["value"] == alone.patient_id
        await job.func()  # polled again unchanged: a duplicate unit, nothing queued
        payloads = [json.loads(crypto.open_value(d.payload, crypto.PAYLOAD)) for d in study_deliveries(app)]
        assert [p["source"] for p in payloads if p["study_instance_uid"] == alone.uid] == ["poll"]
        # the MPPS study was reported by its MPPS already: the poll adds no payload for it
        assert [p["source"] for p in payloads if p["study_instance_uid"] == order.study_uid] == ["mpps"]
    finally:
        await app.stop()


async def test_shipped_configuration(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    """engine.yaml and channels/ as shipped, pointed at Orthanc and sekmet by the environment names
    of DESIGN.md; the images are in the PACS before the MPPS ends (the usual case for a fast modality)."""
    env = engine_env(tmp_path)
    env.update({"PACS_HOST": "127.0.0.1", "PACS_PORT": str(orthanc.dicom_port), "PACS_AET": "ORTHANC",
                "PACS_QIDO_URL": orthanc.qido_url, "PACS_WADORS_URL": orthanc.qido_url,
                "EMR_FHIR_BASE": emr.base_url, "EMR_FHIR_AUTH": "none", "PACS_POLL_MINUTES": "0"})
    registry = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=env), registry)
    await app.start()
    try:
        assert app.scheduler.get_job("pacs-poll") is None  # PACS_POLL_MINUTES=0: no poll
        order = Order()
        await order.place(app)
        plan = kit.StudyPlan(order.accession, order.patient, uid=order.study_uid, series=[
            kit.SeriesPlan("CT", 2, number=1, uid=f"{order.study_uid}.1",
                           instance_uids=[f"{order.study_uid}.1.{i}" for i in (1, 2)])])
        orthanc.store_all(plan.datasets())
        mpps = order.mpps_uid()
        assert (await n_create(app, order.n_create(), mpps)).Status == 0
        assert (await n_set(app, order.completed(series=1, instances=2), mpps)).Status == 0
        [found] = await eventually(lambda: studies_on(emr, order.study_uid), "no ImagingStudy")
        assert found["numberOfInstances"] == 2
        assert found["subject"]["identifier"] == {"system": SYSTEMS["mrn"], "value": order.patient}
        assert found["endpoint"] == [{"reference": "#wadors"}]
        assert found["contained"][0]["address"] == orthanc.qido_url
    finally:
        await app.stop()
