"""Studies benchmark: ImagingStudy from the PACS, for C-FIND and for QIDO-RS.

    python benchmarks/studies.py [--studies 10] [--series 4] [--instances 50]

A real Orthanc (DICOMweb plugin) is started on free ports and loaded over its REST API with N
studies of S series x I instances (copies of pydicom's CT_small.dcm); sekmet plays the EMR.
For each transport:
1. build: per study, the PACS asked (study, series, instance level) and the ImagingStudy built and
   validated, one study after the other: studies/s. Baseline in the same run: the same queries
   sent bare (pynetdicom C-FIND on one association per study, or the same QIDO-RS GETs with
   httpx), nothing built: the PACS's own time. The engine's share is what the engine adds.
2. deliver: one study payload per study (C3, as after MPPS COMPLETED) queued in the durable queue
   (SQLite) and drained by the delivery worker into the `imagingstudy` destination, which asks the
   PACS and writes the ImagingStudy to sekmet by conditional update: studies/s end to end.
3. mpps: the engine with the shipped engine.yaml and channels (in this process, DICOM SCP on a free
   port, PACS_* and EMR_FHIR_BASE pointing at Orthanc and sekmet): per study a modality sends
   N-CREATE and N-SET COMPLETED listing every instance (unscheduled: no worklist items are loaded);
   studies/s from the first N-CREATE until every ImagingStudy delivery is done.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from engine.dicom.pacs import INSTANCE_KEYS, SERIES_KEYS, STUDY_KEYS, find_query, make_pacs  # noqa: E402
from engine.dicom.scp import quiet_pynetdicom, set_nodelay  # noqa: E402
from engine.runtime.delivery import DeliveryWorker  # noqa: E402
from engine.runtime.destinations.imagingstudy import ImagingStudyConfig, ImagingStudyDestination  # noqa: E402
from engine.store import queue  # noqa: E402
from engine.store.db import init_db, make_engine  # noqa: E402
from engine.store.models import Delivery, DeliveryState, Message  # noqa: E402


def _module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kit = _module("orthanc", ROOT / "tests" / "pacs" / "orthanc.py")
servers = _module("fhir_servers", ROOT / "tests" / "fhir" / "fhir_servers.py")
SYSTEMS = {"accession": "urn:oid:1.2.3.4.5.11", "mrn": "urn:oid:1.2.3.4.5.1", "placer": "urn:oid:1.2.3.4.5.3"}


def load(orthanc: Any, studies: int, series: int, instances: int) -> list[Any]:
    plans = []
    for n in range(studies):
        tag = f"{n:05d}{uuid.uuid4().hex[:4]}"
        plans.append(kit.StudyPlan(f"B{tag}", f"PB{tag}", series=[
            kit.SeriesPlan("CT", instances, number=s + 1, description=f"SERIES {s + 1}") for s in range(series)]))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: orthanc.store_all(p.datasets()), plans))
    took = time.perf_counter() - t0
    print(f"loaded {studies} studies x {series} series x {instances} instances into Orthanc in {took:.1f} s "
          f"({studies * series * instances / took:.0f} instances/s)")
    return plans


def destination(orthanc: Any, emr: Any, qido: bool) -> ImagingStudyDestination:
    return ImagingStudyDestination(ImagingStudyConfig.model_validate({
        "name": "imagingstudy", "type": "imagingstudy", "base_url": emr.base_url, "identifier_systems": SYSTEMS,
        "pacs": {"host": "127.0.0.1", "port": orthanc.dicom_port, "aet": kit.AET,
                 "qido_url": orthanc.qido_url if qido else ""},
        "wait_minutes": 0, "defer_seconds": 1, "wadors_url": orthanc.qido_url,
    }))


def bare_cfind(orthanc: Any, uid: str) -> int:
    """The same C-FINDs the engine sends, answers only counted: the PACS's own time."""
    ae = AE(ae_title="ENGINE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=kit.AET)
    assert assoc.is_established
    set_nodelay(assoc.dul.socket.socket)
    try:
        def find(q: Any) -> list[Any]:
            return [i for s, i in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                    if s and s.Status in (0xFF00, 0xFF01)]
        count = len(find(find_query("STUDY", STUDY_KEYS, StudyInstanceUID=uid)))
        for s in find(find_query("SERIES", SERIES_KEYS, StudyInstanceUID=uid)):
            count += len(find(find_query("IMAGE", INSTANCE_KEYS, StudyInstanceUID=uid,
                                     SeriesInstanceUID=str(s.SeriesInstanceUID))))
        return count
    finally:
        assoc.release()


async def bare_qido(client: httpx.AsyncClient, base: str, uid: str) -> int:
    async def get(path: str, params: list[tuple[str, str]]) -> int:
        r = await client.get(f"{base}/{path}", params=params, headers={"Accept": "application/dicom+json"})
        r.raise_for_status()
        return len(r.json())
    inc = [("includefield", k) for k in STUDY_KEYS]
    count = await get("studies", [("StudyInstanceUID", uid), *inc])
    parts = await asyncio.gather(get(f"studies/{uid}/series", [("includefield", k) for k in SERIES_KEYS]),
                                 get(f"studies/{uid}/instances", [("includefield", k) for k in INSTANCE_KEYS]))
    return count + sum(parts)


async def build_phase(orthanc: Any, emr: Any, plans: list[Any], qido: bool) -> tuple[float, float]:
    dest = destination(orthanc, emr, qido)
    p = dest.config.pacs
    pacs = make_pacs(p.host, p.port, p.aet, p.qido_url)
    engine_times, bare_times = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for plan in plans:
            payload = plan.payload()
            t0 = time.perf_counter()
            found = await pacs.study(plan.uid)
            built, _ = dest.plan(payload, found)
            engine_times.append(time.perf_counter() - t0)
            assert built.entries[-1].resource["numberOfInstances"] == sum(len(s.instance_uids) for s in plan.series)
            t0 = time.perf_counter()
            if qido:
                await bare_qido(client, orthanc.qido_url, plan.uid)
            else:
                await asyncio.to_thread(bare_cfind, orthanc, plan.uid)
            bare_times.append(time.perf_counter() - t0)
    await pacs.close()
    return statistics.median(engine_times), statistics.median(bare_times)


async def deliver_phase(tmp: Path, orthanc: Any, emr: Any, plans: list[Any], qido: bool) -> float:
    db = make_engine(f"sqlite:///{tmp / f'engine-{int(qido)}.db'}")
    init_db(db)
    messages, deliveries = Message.__table__, Delivery.__table__  # type: ignore[attr-defined]
    with db.begin() as conn:
        for plan in plans:
            mid = conn.execute(insert(messages).values(channel="pacs-studies", raw=b"{}")).inserted_primary_key[0]
            conn.execute(insert(deliveries).values(
                message_id=mid, channel="pacs-studies", destination="imagingstudy",
                ordering_key=f"study:{plan.uid}", payload=json.dumps(plan.payload()).encode(),
                content_type="application/json"))
    dest = destination(orthanc, emr, qido)
    await dest.start()
    worker = DeliveryWorker(db, "pacs-studies", {dest.name: dest}, queue.RetryPolicy(3, 0.5, 2), poll_interval=0.05)
    t0 = time.perf_counter()
    worker.start()
    while True:
        with db.connect() as conn:
            rows = dict(conn.execute(select(deliveries.c.state, func.count()).group_by(deliveries.c.state)).all())
        if rows.get(DeliveryState.DONE, 0) + rows.get(DeliveryState.DEAD, 0) >= len(plans):
            break
        await asyncio.sleep(0.05)
    took = time.perf_counter() - t0
    await worker.stop()
    await dest.stop()
    db.dispose()
    if rows.get(DeliveryState.DEAD):
        raise SystemExit(f"{rows[DeliveryState.DEAD]} deliveries went dead")
    return len(plans) / took


def n_create(plan: Any) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = plan.patient_name, plan.patient_id, "", ""
    item = Dataset()
    item.StudyInstanceUID, item.ReferencedStudySequence = plan.uid, []
    item.AccessionNumber, item.RequestedProcedureID = plan.accession, ""
    item.RequestedProcedureDescription, item.ScheduledProcedureStepID = "", ""
    item.ScheduledProcedureStepDescription, item.ScheduledProtocolCodeSequence = "", []
    ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedProcedureStepID, ds.PerformedStationAETitle = "PPS1", "CT1"
    ds.PerformedStationName, ds.PerformedLocation = "", ""
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = plan.study_date, plan.study_time
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription, ds.PerformedProcedureTypeDescription = plan.description, ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = "", ""
    ds.Modality, ds.StudyID = "CT", ""
    ds.PerformedProtocolCodeSequence, ds.PerformedSeriesSequence = [], []
    return ds


def n_set(plan: Any) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = plan.study_date, "235959"
    items = []
    for s in plan.series:
        series = Dataset()
        series.PerformingPhysicianName, series.OperatorsName, series.ProtocolName = "TECH^TOM", "", "Chest"
        series.SeriesInstanceUID, series.SeriesDescription, series.RetrieveAETitle = s.uid, s.description, ""
        refs = []
        for uid in s.instance_uids:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uid
            refs.append(ref)
        series.ReferencedImageSequence, series.ReferencedNonImageCompositeSOPInstanceSequence = refs, []
        items.append(series)
    ds.PerformedSeriesSequence = items
    return ds


def modality(port: int, plans: list[Any]) -> None:
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

    ae = AE(ae_title="CT1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    set_nodelay(assoc.dul.socket.socket)
    try:
        for plan in plans:
            uid = generate_uid()
            status, _ = assoc.send_n_create(n_create(plan), ModalityPerformedProcedureStep, uid)
            assert status is not None and status.Status == 0, status
            status, _ = assoc.send_n_set(n_set(plan), ModalityPerformedProcedureStep, uid)
            assert status is not None and status.Status == 0, status
    finally:
        assoc.release()


async def mpps_phase(tmp: Path, orthanc: Any, emr: Any, plans: list[Any], qido: bool) -> float:
    import os

    from engine.runtime.app import EngineApp, default_registry
    from engine.runtime.config import load_config

    folder = tmp / f"engine-mpps-{int(qido)}"
    folder.mkdir()
    env = dict(os.environ)
    env.update({
        "ENGINE_STORAGE_URL": f"sqlite:///{folder / 'engine.db'}", "ORDERS_MLLP_PORT": "0", "RESULTS_MLLP_PORT": "0",
        "DICOM_PORT": "0", "HTTP_PORT": "0", "ENGINE_LOG_LEVEL": "WARNING", "ORDERS_ARCHIVE_DIR": str(folder / "a"),
        "RESULTS_OUTBOX_DIR": str(folder / "o"), "EMR_FHIR_BASE": emr.base_url, "EMR_FHIR_AUTH": "none",
        "PACS_HOST": "127.0.0.1", "PACS_PORT": str(orthanc.dicom_port), "PACS_AET": kit.AET,
        "PACS_QIDO_URL": orthanc.qido_url if qido else "", "PACS_POLL_MINUTES": "0",
        "RIS_STATUS_PORT": str(kit.free_port()),  # no RIS: its status messages wait in the queue
    })
    registry = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=env), registry)
    logging.getLogger("engine").setLevel(logging.ERROR)  # every step is unscheduled (no order): said once here
    await app.start()
    assert app.db is not None
    deliveries = Delivery.__table__  # type: ignore[attr-defined]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(asyncio.to_thread(modality, app.scp.port, plans[i::4]) for i in range(4)))
        while True:
            with app.db.connect() as conn:
                rows = dict(conn.execute(select(deliveries.c.state, func.count())
                                         .where(deliveries.c.destination == "imagingstudy")
                                         .group_by(deliveries.c.state)).all())
            if rows.get(DeliveryState.DONE, 0) + rows.get(DeliveryState.DEAD, 0) >= len(plans):
                break
            await asyncio.sleep(0.05)
        took = time.perf_counter() - t0
    finally:
        await app.stop()
    if rows.get(DeliveryState.DEAD):
        raise SystemExit(f"{rows[DeliveryState.DEAD]} ImagingStudy deliveries went dead")
    return len(plans) / took


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--instances", type=int, default=50)
    args = ap.parse_args()
    quiet_pynetdicom()
    tmp = Path(tempfile.mkdtemp(prefix="bench-studies-"))
    orthanc, emr = kit.Orthanc(tmp / "orthanc"), servers.Sekmet(tmp / "sekmet")
    orthanc.start()
    emr.start()
    try:
        plans = load(orthanc, args.studies, args.series, args.instances)
        print(f"{'transport':10} {'engine ms/study':>16} {'PACS alone ms':>14} {'engine share':>13} "
              f"{'built/s':>8} {'delivered/s':>12} {'MPPS->EMR/s':>12}")
        for qido in (False, True):
            engine_s, bare_s = await build_phase(orthanc, emr, plans, qido)
            rate = await deliver_phase(tmp, orthanc, emr, plans, qido)
            mpps = await mpps_phase(tmp, orthanc, emr, plans, qido)
            share = max(0.0, engine_s - bare_s) / engine_s
            print(f"{'QIDO-RS' if qido else 'C-FIND':10} {engine_s * 1000:16.1f} {bare_s * 1000:14.1f} "
                  f"{share:13.0%} {1 / engine_s:8.1f} {rate:12.1f} {mpps:12.1f}")
        print("engine ms/study and PACS alone: medians, one study at a time; delivered/s: queue -> PACS -> "
              "ImagingStudy -> EMR (conditional update), the worker running up to 64 at once; MPPS->EMR/s: "
              "4 modalities, N-CREATE + N-SET COMPLETED each, until every ImagingStudy is written")
    finally:
        emr.stop()
        orthanc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
