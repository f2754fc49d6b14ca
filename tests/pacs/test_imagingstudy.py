"""ImagingStudy from the PACS, end to end over real sockets: study payloads (C3) queued in the real
durable queue, drained by the real delivery worker into the `imagingstudy` destination, which asks a
real Orthanc (C-FIND or QIDO-RS) and writes to a real FHIR server (sekmet)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import Engine, insert, select

from engine.dicom.pacs import CFindPacs, QidoPacs
from engine.inputs import Outcome
from engine.runtime.delivery import DeliveryWorker
from engine.runtime.destinations.imagingstudy import ImagingStudyConfig, ImagingStudyDestination, found_payload
from engine.runtime.jobs_pacs import PacsPoll
from engine.store import queue
from engine.store.db import init_db, make_engine
from engine.store.models import Delivery, DeliveryState, Message, MessageStatus

DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
MESSAGES = Message.__table__  # type: ignore[attr-defined]
SYSTEMS = {"accession": "urn:oid:1.2.3.4.5.11", "mrn": "urn:oid:1.2.3.4.5.1", "placer": "urn:oid:1.2.3.4.5.3",
           "filler": "urn:oid:1.2.3.4.5.4"}
CHANNEL = "pacs-studies"


def destination(orthanc: Any, emr: Any, *, qido: bool = False, **cfg: Any) -> ImagingStudyDestination:
    config = ImagingStudyConfig.model_validate({
        "name": "imagingstudy", "type": "imagingstudy", "base_url": emr.base_url, "identifier_systems": SYSTEMS,
        "pacs": {"host": "127.0.0.1", "port": orthanc.dicom_port, "aet": "ORTHANC",
                 "qido_url": orthanc.qido_url if qido else ""},
        "wait_minutes": 10, "defer_seconds": 0.3, **cfg,
    })
    return ImagingStudyDestination(config)


@contextlib.asynccontextmanager
async def draining(tmp_path: Path, dest: ImagingStudyDestination) -> AsyncIterator[Engine]:
    db = make_engine(f"sqlite:///{tmp_path / f'engine-{uuid.uuid4().hex[:6]}.db'}")
    init_db(db)
    await dest.start()
    worker = DeliveryWorker(db, CHANNEL, {dest.name: dest}, queue.RetryPolicy(5, 0.2, 1.0), poll_interval=0.1)
    worker.start()
    try:
        yield db
    finally:
        await worker.stop()
        await dest.stop()
        db.dispose()


def enqueue(db: Engine, payload: dict[str, Any]) -> int:
    """What the `steps` destination does in the unit's transaction (C2): one queued study payload."""
    with db.begin() as conn:
        mid = conn.execute(insert(MESSAGES).values(channel=CHANNEL, raw=b"{}", control_id=uuid.uuid4().hex,
                                                   message_type="MPPS^N-SET")).inserted_primary_key[0]
        return int(conn.execute(insert(DELIVERIES).values(
            message_id=mid, channel=CHANNEL, destination="imagingstudy",
            ordering_key=f"study:{payload['study_instance_uid']}", payload=json.dumps(payload).encode(),
            content_type="application/json")).inserted_primary_key[0])


def row(db: Engine, delivery_id: int) -> Any:
    with db.connect() as conn:
        return conn.execute(select(DELIVERIES).where(DELIVERIES.c.id == delivery_id)).one()


async def until(db: Engine, delivery_id: int, check: Any, timeout: float = 90) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = row(db, delivery_id)
        if check(r):
            return r
        assert asyncio.get_running_loop().time() < deadline, f"delivery {delivery_id}: {r.state} {r.last_error}"
        await asyncio.sleep(0.1)


def done(r: Any) -> bool:
    return r.state in (DeliveryState.DONE, DeliveryState.DEAD)


def studies_on(emr: Any, study_uid: str) -> list[dict[str, Any]]:
    return emr.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")


def new_study(kit: ModuleType, series: list[Any] | None = None) -> Any:
    n = uuid.uuid4().hex[:8]
    return kit.StudyPlan(f"A{n}", f"P{n}", series=series or [kit.SeriesPlan("CT", 3, number=1),
                                                             kit.SeriesPlan("MR", 2, number=2, laterality="L",
                                                                            body_part="KNEE")])


async def test_images_after_the_mpps_defer_then_build(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    study = new_study(kit)
    async with draining(tmp_path, destination(orthanc, emr)) as db:
        did = enqueue(db, study.payload())
        waiting = await until(db, did, lambda r: "waiting for images" in r.response)
        assert waiting.state in (DeliveryState.PENDING, DeliveryState.DOING) and waiting.attempts == 0
        orthanc.store_all(study.datasets()[:2])  # part of the images: still waiting
        await until(db, did, lambda r: "holds 2 of 5" in r.response)
        assert row(db, did).attempts == 0 and not studies_on(emr, study.uid)
        orthanc.store_all(study.datasets()[2:])
        final = await until(db, did, done)
    assert final.state == DeliveryState.DONE, final.last_error
    assert final.attempts == 1  # the deferrals spent no attempt
    assert "warning" not in final.response
    [found] = studies_on(emr, study.uid)
    assert found["status"] == "available"
    assert found["numberOfSeries"] == 2 and found["numberOfInstances"] == 5
    assert {"system": SYSTEMS["accession"], "value": study.accession} in [
        {k: i.get(k) for k in ("system", "value")} for i in found["identifier"]]
    assert found["subject"]["identifier"] == {"system": SYSTEMS["mrn"], "value": study.patient_id}
    assert found["basedOn"][0]["identifier"] == {"system": SYSTEMS["placer"], "value": f"P{study.accession}"}
    assert found["started"].startswith("2026-12-01T10:15:00")
    assert found["procedureCode"][0]["coding"][0]["code"] == "CTCHEST"
    assert found["referrer"]["display"] == "GREGORY HOUSE"
    ct, mr = found["series"]
    assert ct["uid"] == study.series[0].uid and ct["modality"]["code"] == "CT" and ct["number"] == 1
    assert [i["uid"] for i in ct["instance"]] == study.series[0].instance_uids
    assert ct["instance"][0]["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    assert ct["instance"][2]["number"] == 3
    assert ct["bodySite"]["code"] == "816094009" and ct["performer"][0]["actor"]["display"] == "TOM TECH"
    assert mr["laterality"]["code"] == "7771000" and mr["bodySite"]["code"] == "72696002"


async def test_same_study_twice_is_one_imagingstudy(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    study = new_study(kit)
    orthanc.store_all(study.datasets())
    async with draining(tmp_path, destination(orthanc, emr)) as db:
        first = enqueue(db, study.payload())
        second = enqueue(db, study.payload())  # the same COMPLETED again (a resent N-SET, a replay)
        a = await until(db, first, done)
        b = await until(db, second, done)
    assert a.state == b.state == DeliveryState.DONE, (a.last_error, b.last_error)
    found = studies_on(emr, study.uid)
    assert len(found) == 1
    assert found[0]["numberOfInstances"] == 5
    assert len(emr.history("ImagingStudy", found[0]["id"])) == 2  # updated, not duplicated


async def test_series_added_later_updates_counts(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    study = new_study(kit)
    first, second = study.series
    wado = f"{orthanc.url}/dicom-web"
    async with draining(tmp_path, destination(orthanc, emr, wadors_url=wado)) as db:
        orthanc.store_all(study.datasets([first]))
        one = await until(db, enqueue(db, study.payload([first])), done)
        assert one.state == DeliveryState.DONE, one.last_error
        [before] = studies_on(emr, study.uid)
        assert before["numberOfSeries"] == 1 and before["numberOfInstances"] == 3
        orthanc.store_all(study.datasets([second]))  # a second step (MPPS) on the same study
        two = await until(db, enqueue(db, study.payload([second])), done)
    assert two.state == DeliveryState.DONE, two.last_error
    [after] = studies_on(emr, study.uid)
    assert after["id"] == before["id"]
    assert after["numberOfSeries"] == 2 and after["numberOfInstances"] == 5
    assert sorted(s["modality"]["code"] for s in after["series"]) == ["CT", "MR"]
    [endpoint] = after["contained"]
    assert endpoint["address"] == wado and endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert after["endpoint"] == [{"reference": "#wadors"}]


async def test_qido_and_cfind_give_the_same_imagingstudy(tmp_path: Path, orthanc: Any, emr: Any,
                                                         kit: ModuleType) -> None:
    study = new_study(kit)
    orthanc.store_all(study.datasets())
    payload = study.payload()
    by_cfind = await CFindPacs("127.0.0.1", orthanc.dicom_port, "ORTHANC").study(study.uid)
    qido = QidoPacs(orthanc.qido_url)
    try:
        by_qido = await qido.study(study.uid)
    finally:
        await qido.close()
    assert by_cfind is not None and by_cfind == by_qido
    dest = destination(orthanc, emr)
    plan_c, _ = dest.plan(payload, by_cfind)
    plan_q, _ = dest.plan(payload, by_qido)
    assert plan_c.to_json() == plan_q.to_json()
    async with draining(tmp_path, destination(orthanc, emr, qido=True)) as db:
        r = await until(db, enqueue(db, payload), done)
    assert r.state == DeliveryState.DONE, r.last_error
    [written] = studies_on(emr, study.uid)
    built = plan_c.entries[-1].resource
    for key in ("identifier", "status", "numberOfSeries", "numberOfInstances", "series", "started", "modality"):
        assert written[key] == built[key], key


async def test_wait_ends_with_instances_missing(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    study = new_study(kit, [kit.SeriesPlan("CT", 4)])
    orthanc.store_all(study.datasets()[:3])  # one image never reaches the PACS
    async with draining(tmp_path, destination(orthanc, emr, wait_minutes=0)) as db:
        r = await until(db, enqueue(db, study.payload()), done)
    assert r.state == DeliveryState.DONE, r.last_error
    assert "warning: built after waiting 0 min with 3 of 4 instances the MPPS listed" in r.response
    [found] = studies_on(emr, study.uid)
    assert found["numberOfInstances"] == 3


async def test_study_the_pacs_never_gets_is_dead_after_the_wait(tmp_path: Path, orthanc: Any, emr: Any,
                                                                kit: ModuleType) -> None:
    study = new_study(kit)
    payload = study.payload(performed_series=[])  # nothing listed, nothing in the PACS
    async with draining(tmp_path, destination(orthanc, emr, wait_minutes=0)) as db:
        r = await until(db, enqueue(db, payload), done)
    assert r.state == DeliveryState.DEAD and "does not hold the study" in r.last_error
    assert not studies_on(emr, study.uid)


class Collect:
    def __init__(self) -> None:
        self.units: list[bytes] = []

    async def receive(self, raw: bytes, *, replay_of: int | None = None) -> Outcome:
        self.units.append(raw)
        return Outcome(status=MessageStatus.PROCESSED, message_id=len(self.units))


async def test_poll_finds_a_study_without_mpps(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    study = new_study(kit)
    study.study_date = datetime.now(UTC).strftime("%Y%m%d")
    orthanc.store_all(study.datasets())
    collect = Collect()
    poll = PacsPoll(lambda: CFindPacs("127.0.0.1", orthanc.dicom_port, "ORTHANC"), collect, days=1,
                    engine_aet="ENGINE", tz=ZoneInfo("UTC"))
    await poll.run()
    units = [json.loads(u) for u in collect.units]
    [unit] = [u for u in units if u["sop_instance_uid"] == study.uid]
    assert unit["command"] == "FOUND" and unit["called_aet"] == "ENGINE" and unit["calling_aet"] == ""
    ds = unit["dataset"]
    assert ds["0020000D"]["Value"] == [study.uid]
    assert ds["00080050"]["Value"] == [study.accession]
    assert ds["00201208"]["Value"] == [5]  # NumberOfStudyRelatedInstances: the control id's "#5"
    assert sorted(ds["00080061"]["Value"]) == ["CT", "MR"]
    # the FOUND unit becomes a study payload (source poll) and an ImagingStudy
    raw = next(u for u in collect.units if study.uid.encode() in u)
    payload = found_payload(raw)
    assert payload["source"] == "poll" and payload["status"] == "FOUND" and payload["performed_series"] == []
    async with draining(tmp_path, destination(orthanc, emr)) as db:
        r = await until(db, enqueue(db, payload), done)
    assert r.state == DeliveryState.DONE, r.last_error
    [found] = studies_on(emr, study.uid)
    assert found["numberOfInstances"] == 5 and "basedOn" in found  # by accession: no order numbers from a poll


async def test_the_accessions_report_references_the_study(tmp_path: Path, orthanc: Any, emr: Any,
                                                          kit: ModuleType) -> None:
    import httpx

    study = new_study(kit)
    orthanc.store_all(study.datasets())
    report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT chest"},
              "identifier": [{"system": SYSTEMS["accession"], "value": study.accession}],
              "subject": {"identifier": {"system": SYSTEMS["mrn"], "value": study.patient_id}}}
    put = httpx.put(f"{emr.base_url}/DiagnosticReport", params={"identifier": f"{SYSTEMS['accession']}|"
                                                                              f"{study.accession}"},
                    json=report, headers={"Content-Type": "application/fhir+json"}, timeout=30)
    assert put.status_code in (200, 201), put.text
    async with draining(tmp_path, destination(orthanc, emr)) as db:
        r = await until(db, enqueue(db, study.payload()), done)
        assert r.state == DeliveryState.DONE, r.last_error
        again = await until(db, enqueue(db, study.payload()), done)  # linked once, not twice
    assert again.state == DeliveryState.DONE, again.last_error
    [img] = studies_on(emr, study.uid)
    [linked] = emr.search("DiagnosticReport", identifier=f"{SYSTEMS['accession']}|{study.accession}")
    assert linked["imagingStudy"] == [{"reference": f"ImagingStudy/{img['id']}"}]
    assert linked["status"] == "final" and linked["code"] == {"text": "CT chest"}  # the rest left as it was


async def test_pacs_down_is_retried_with_backoff(tmp_path: Path, orthanc: Any, emr: Any, kit: ModuleType) -> None:
    study = new_study(kit)
    closed = kit.free_port()  # nothing listens there
    dest = destination(orthanc, emr, pacs={"host": "127.0.0.1", "port": closed, "aet": "ORTHANC", "timeout": 5})
    async with draining(tmp_path, dest) as db:
        did = enqueue(db, study.payload())
        r = await until(db, did, lambda r: r.attempts >= 1 and r.state == DeliveryState.PENDING)
    # an attempt spent (the PACS is down), not a deferral (the PACS answered, images missing)
    assert "PACS: PACS ORTHANC at 127.0.0.1" in r.last_error and "ConnectionRefusedError" in r.last_error
    qido = destination(orthanc, emr, pacs={"qido_url": f"http://127.0.0.1:{closed}/dicom-web"})
    async with draining(tmp_path, qido) as db:
        r = await until(db, enqueue(db, study.payload()), lambda r: r.attempts >= 1)
    assert r.state == DeliveryState.PENDING and "QIDO-RS studies: ConnectError" in r.last_error
