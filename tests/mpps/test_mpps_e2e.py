"""MPPS in, end to end through the shipped configuration: a pynetdicom SCU plays the modality
against the engine's SCP, our own MLLP listener plays the RIS, dcmtk's findscu reads the worklist.

Orders reach the worklist over MLLP (ris-orders); the modality reports N-CREATE IN PROGRESS and
N-SET COMPLETED/DISCONTINUED; the RIS gets ORM^O01 SC with ORC-5 IP then CM (or DC)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.runtime.app import EngineApp
from engine.store.models import Delivery
from engine.store.models import Message as StoredMessage
from engine.store.steps import PerformedStep
from engine.store.worklist import WorklistItem
from tests.mpps.conftest import FakeRis, Order, n_create, n_set

MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
STEPS = PerformedStep.__table__  # type: ignore[attr-defined]
ITEMS = WorklistItem.__table__  # type: ignore[attr-defined]
FINDSCU = Path("/usr/bin/findscu")
CHANNEL = "pacs-studies"


def stored(app: EngineApp) -> list[dict[str, Any]]:
    assert app.db is not None
    with app.db.connect() as conn:
        query = select(MESSAGES).where(MESSAGES.c.channel == CHANNEL).order_by(MESSAGES.c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def step(app: EngineApp, uid: str) -> dict[str, Any] | None:
    assert app.db is not None
    with app.db.connect() as conn:
        row = conn.execute(select(STEPS).where(STEPS.c.sop_instance_uid == uid)).mappings().first()
    return dict(row) if row is not None else None


def item_status(app: EngineApp, order: Order) -> str:
    assert app.db is not None
    with app.db.connect() as conn:
        return str(conn.execute(select(ITEMS.c.status).where(ITEMS.c.accession_number == order.accession)).scalar())


def status_of(msg: Any) -> tuple[str, str]:
    return msg.get("ORC-1"), msg.get("ORC-5")


async def test_in_progress_then_completed_reaches_worklist_and_ris(
    any_db_engine: EngineApp, ris: FakeRis, tmp_path: Path
) -> None:
    engine = any_db_engine
    order = Order()
    await order.place(engine)
    uid = order.mpps_uid()

    status = await n_create(engine, order.n_create(), uid)
    assert status.Status == 0x0000
    assert item_status(engine, order) == "IN PROGRESS"
    if FINDSCU.exists():  # the modality sees the step as STARTED in the worklist
        found = await findscu(engine, tmp_path / "find1", order.accession)
        assert found == ["STARTED"]

    status = await n_set(engine, order.completed(), uid)
    assert status.Status == 0x0000
    assert item_status(engine, order) == "COMPLETED"
    if FINDSCU.exists():  # finished: off the worklist
        assert await findscu(engine, tmp_path / "find2", order.accession) == []

    got = await ris.wait_for(2)
    assert [status_of(m) for m in got] == [("SC", "IP"), ("SC", "CM")]
    for msg in got:
        assert msg.message_type == "ORM^O01"
        assert msg.get("ORC-2") == order.placer and msg.get("OBR-2") == order.placer
        assert msg.get("ORC-3") == order.filler and msg.get("OBR-3") == order.filler
        assert msg.get("OBR-18") == order.accession
        assert msg.get("PID-3.1") == order.patient and msg.get("PID-3.4") == "HOSP"
    assert got[0].control_id != got[1].control_id
    assert got[1].get("OBR-8") == "20261125103000"

    rows = stored(engine)
    assert [(r["message_type"], r["status"], r["control_id"].split("#")[0]) for r in rows] == [
        ("MPPS^N-CREATE", "processed", uid),
        ("MPPS^N-SET", "processed", uid),
    ]
    raw = json.loads(rows[0]["raw"])  # stored as received: the C1 envelope
    assert raw["command"] == "N-CREATE" and raw["sop_instance_uid"] == uid and raw["calling_aet"] == "CT1"
    assert raw["dataset"]["00400253"]["Value"] == [f"PPS{order.tag}"]
    performed = step(engine, uid)
    assert performed is not None and performed["status"] == "COMPLETED" and performed["worklist_items"]


async def test_discontinued_keeps_the_reason_and_tells_the_ris(engine: EngineApp, ris: FakeRis) -> None:
    order = Order()
    await order.place(engine)
    uid = order.mpps_uid()
    assert (await n_create(engine, order.n_create(), uid)).Status == 0
    stop = Dataset()
    stop.PerformedProcedureStepStatus = "DISCONTINUED"
    reason = Dataset()
    reason.CodeValue, reason.CodingSchemeDesignator, reason.CodeMeaning = "110514", "DCM", "Incorrect worklist entry"
    stop.PerformedProcedureStepDiscontinuationReasonCodeSequence = [reason]
    stop.PerformedProcedureStepEndDate, stop.PerformedProcedureStepEndTime = "20261125", "102000"
    assert (await n_set(engine, stop, uid)).Status == 0
    assert item_status(engine, order) == "DISCONTINUED"
    performed = step(engine, uid)
    assert performed is not None and performed["discontinuation_reason"] == "110514^DCM^Incorrect worklist entry"
    got = await ris.wait_for(2)
    assert [status_of(m) for m in got] == [("SC", "IP"), ("SC", "DC")]
    assert got[1].get("ORC-16.1") == "110514" and got[1].get("ORC-16.3") == "DCM"


async def test_unscheduled_step_is_kept_and_flagged(engine: EngineApp, ris: FakeRis) -> None:
    order = Order()  # never placed: no worklist item
    uid = order.mpps_uid()
    assert (await n_create(engine, order.n_create(scheduled=False), uid)).Status == 0
    assert (await n_set(engine, order.completed(), uid)).Status == 0
    performed = step(engine, uid)
    assert performed is not None and performed["worklist_items"] == "" and performed["status"] == "COMPLETED"
    first = stored(engine)[0]
    assert first["status"] == "processed" and "unscheduled" in first["flags"].split(",")
    assert "ScheduledStepAttributesSequence" in first["warnings"]
    await asyncio.sleep(0.5)
    assert ris.received == []  # the RIS has no order to tell about


@pytest.mark.parametrize(
    ("change", "expected", "where"),
    [
        ({"PerformedProcedureStepID": None}, 0x0120, "PerformedProcedureStepID"),
        ({"ScheduledStepAttributesSequence": None}, 0x0120, "ScheduledStepAttributesSequence"),
        ({"Modality": ""}, 0x0121, "Modality"),
        ({"PerformedProcedureStepStatus": "COMPLETED"}, 0x0106, "PerformedProcedureStepStatus"),
        ({"PerformedProcedureStepStartDate": "25.11.2026"}, 0x0106, "PerformedProcedureStepStartDate"),
    ],
)
async def test_malformed_n_create_is_refused_and_stored_as_error(
    engine: EngineApp, change: dict[str, Any], expected: int, where: str
) -> None:
    order = Order()
    await order.place(engine)
    uid = order.mpps_uid()
    status = await n_create(engine, order.n_create(**change), uid)
    assert status.Status == expected
    assert where in str(status.ErrorComment)
    rows = stored(engine)
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["error_location"] == where
    assert step(engine, uid) is None
    assert item_status(engine, order) == "SCHEDULED"
    # the engine keeps serving: the fixed N-CREATE goes through
    assert (await n_create(engine, order.n_create(), uid)).Status == 0
    assert item_status(engine, order) == "IN PROGRESS"


async def test_missing_study_uid_in_the_scheduled_step_item(engine: EngineApp) -> None:
    order = Order()
    ds = order.n_create()
    del ds.ScheduledStepAttributesSequence[0].StudyInstanceUID
    status = await n_create(engine, ds, order.mpps_uid())
    assert status.Status == 0x0120
    assert "ScheduledStepAttributesSequence[0].StudyInstanceUID" in str(status.ErrorComment)


async def test_second_n_create_for_the_same_instance_is_a_duplicate_instance(engine: EngineApp) -> None:
    order = Order()
    await order.place(engine)
    uid = order.mpps_uid()
    assert (await n_create(engine, order.n_create(), uid)).Status == 0
    other = order.n_create(PerformedProcedureStepDescription="another")
    assert (await n_create(engine, other, uid)).Status == 0x0111


async def test_n_set_for_an_unknown_instance(engine: EngineApp) -> None:
    status = await n_set(engine, Order().completed(), "1.2.826.0.1.3680043.8.497.404")
    assert status.Status == 0x0112
    assert stored(engine)[0]["status"] == "error"


async def test_n_set_after_final_is_refused_with_a_reason(engine: EngineApp, ris: FakeRis) -> None:
    order = Order()
    await order.place(engine)
    uid = order.mpps_uid()
    assert (await n_create(engine, order.n_create(), uid)).Status == 0
    assert (await n_set(engine, order.completed(), uid)).Status == 0
    late = Dataset()
    late.PerformedProcedureStepDescription = "changed afterwards"
    status = await n_set(engine, late, uid)
    assert status.Status == 0x0110
    assert status.ErrorID == 0xA710
    assert "COMPLETED" in str(status.ErrorComment)
    await ris.wait_for(2)
    await asyncio.sleep(0.3)
    assert len(ris.received) == 2  # nothing more for the RIS


async def test_the_same_n_set_twice_is_a_duplicate_answered_the_same(engine: EngineApp, ris: FakeRis) -> None:
    order = Order()
    await order.place(engine)
    uid = order.mpps_uid()
    assert (await n_create(engine, order.n_create(), uid)).Status == 0
    progress = Dataset()
    progress.PerformedProcedureStepDescription = "CT head, contrast"
    assert (await n_set(engine, progress, uid)).Status == 0
    assert (await n_set(engine, progress, uid)).Status == 0  # resent after a lost response
    assert (await n_set(engine, order.completed(), uid)).Status == 0
    assert (await n_set(engine, order.completed(), uid)).Status == 0  # the same final N-SET again
    statuses = [r["status"] for r in stored(engine)]
    assert statuses == ["processed", "processed", "duplicate", "processed", "duplicate"]
    await ris.wait_for(2)
    await asyncio.sleep(0.3)
    assert [status_of(m) for m in ris.received] == [("SC", "IP"), ("SC", "CM")]


async def test_omi_status_and_not_settable_attributes(tmp_path: Path, ris: FakeRis) -> None:
    """OMI^O23 when configured (accession in IPC-1); an attribute N-SET may not change is dropped
    with a warning."""
    from engine.runtime.app import default_registry
    from engine.runtime.config import load_config
    from tests.conftest import ROOT, engine_env

    env = engine_env(tmp_path) | {"RIS_STATUS_PORT": str(ris.port), "RIS_STATUS_MESSAGE": "OMI^O23"}
    registry = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=env), registry)
    await app.start()
    try:
        order = Order()
        await order.place(app)
        uid = order.mpps_uid()
        assert (await n_create(app, order.n_create(), uid)).Status == 0
        change = order.completed()
        change.PatientID = "OTHER"  # not N-SET-able
        assert (await n_set(app, change, uid)).Status == 0
        got = await ris.wait_for(2)
        assert [m.message_type for m in got] == ["OMI^O23", "OMI^O23"]
        assert got[1].get("IPC-1") == order.accession and got[1].get("ORC-5") == "CM"
        assert got[1].get("IPC-3") == order.study_uid
        rows = stored(app)
        assert "PatientID" in rows[1]["warnings"]
        performed = step(app, uid)
        assert performed is not None and performed["patient_id"] == order.patient
    finally:
        await app.stop()


async def test_completed_emits_the_study_payload_when_study_to_is_set(tmp_path: Path) -> None:
    """With `study_to` (the PACS helper's imagingstudy destination; a file destination stands in),
    COMPLETED queues the C3 study payload; the poll's FOUND of that study is not reported again
    unless the PACS holds more instances than the MPPS listed; a study found without MPPS is."""
    from tests.mpps.study_to import run_study_to

    payloads = await run_study_to(tmp_path)
    assert [p["source"] for p in payloads] == ["mpps", "poll", "poll"]
    mpps = payloads[0]
    assert mpps["status"] == "COMPLETED" and mpps["placer_order"].startswith("PL")
    assert len(mpps["performed_series"]) == 2
    assert len(mpps["performed_series"][0]["instances"]) == 3
    assert mpps["performers"] == ["Tech^Tina"] and mpps["started"] == "20261125101500"
    assert mpps["procedure_code"] == [{"code": "CTHEAD", "system": "LOCAL", "display": "CT Head without contrast"}]
    assert payloads[1]["status"] == "FOUND" and payloads[1]["performed_series"] == []
    assert payloads[1]["placer_order"] == mpps["placer_order"]  # the order, from the worklist item
    assert payloads[2]["placer_order"] == ""  # a study the RIS did not order here


async def test_a_destination_steps_emits_to_that_takes_raw_units_gets_both(tmp_path: Path) -> None:
    from tests.mpps.study_to import CHANNEL, run_study_to

    payloads = await run_study_to(tmp_path, CHANNEL.replace("content: mapped", "content: raw"))
    assert [p["source"] for p in payloads] == ["mpps", "poll", "poll"]


async def findscu(app: EngineApp, out: Path, accession: str) -> list[str]:
    """dcmtk's findscu for one accession: the SPS Status of each answer."""
    out.mkdir(parents=True, exist_ok=True)
    args = [str(FINDSCU), "-W", "-aet", "RISFIND", "-aec", "ENGINE", "-X", "-od", str(out),
            "-k", f"AccessionNumber={accession}", "-k", "PatientID",
            "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus",
            "127.0.0.1", str(app.scp.port)]
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from pydicom import dcmread

    answers = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return [str(a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus) for a in answers]


async def test_ris_down_blocks_nothing_and_gets_the_status_once_it_listens(tmp_path: Path) -> None:
    """No RIS on RIS_STATUS_PORT: the modality is answered at once, the status waits in the queue
    (retried, with the reason), orders still flow; when the RIS starts listening it gets the update."""
    from engine.runtime.app import default_registry
    from engine.runtime.config import load_config
    from tests.conftest import ROOT, engine_env, free_port

    port = free_port()
    env = engine_env(tmp_path) | {"RIS_STATUS_PORT": str(port)}
    registry = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=env), registry)
    await app.start()
    late = FakeRis()
    try:
        order = Order()
        await order.place(app)
        assert (await n_create(app, order.n_create(), order.mpps_uid())).Status == 0
        assert app.db is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            with app.db.connect() as conn:
                row = conn.execute(select(DELIVERIES).where(DELIVERIES.c.destination == "ris")).mappings().first()
            if row is not None and row["attempts"] >= 1:
                break
            assert loop.time() < deadline, "the status delivery was never tried"
            await asyncio.sleep(0.1)
        assert row["state"] == "pending" and "not delivered" in row["last_error"]
        second = Order()
        await second.place(app)  # the orders channel is not held up
        late.server = await asyncio.start_server(late._serve, "127.0.0.1", port)
        got = await late.wait_for(1, timeout=120)
        assert status_of(got[0]) == ("SC", "IP") and got[0].get("ORC-3") == order.filler
    finally:
        await app.stop()
        if late.server is not None:
            late.server.close()
            await late.server.wait_closed()


async def test_engine_messages_reports_the_unscheduled_step(engine: EngineApp, tmp_path: Path) -> None:
    import sys

    from tests.conftest import ROOT, engine_env

    order = Order()
    uid = order.mpps_uid()
    assert (await n_create(engine, order.n_create(scheduled=False), uid)).Status == 0
    args = [sys.executable, "-m", "engine", "messages", "-c", str(ROOT / "engine.yaml"), "--channel", CHANNEL,
            "--warnings", "--json"]
    done = await asyncio.to_thread(subprocess.run, args, env=engine_env(tmp_path), capture_output=True, text=True,
                                   timeout=120)
    assert done.returncode == 0, done.stderr
    listed = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(m["control_id"], m["flags"]) for m in listed] == [(uid, "unscheduled")]
    assert "unscheduled step" in json.dumps(listed[0]["warnings"])
    shown = await asyncio.to_thread(
        subprocess.run, [*args[:4], "show", str(listed[0]["id"]), "-c", str(ROOT / "engine.yaml")],
        env=engine_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "flags: unscheduled" in shown.stdout


async def test_n_create_without_an_instance_uid_gets_one_from_the_engine(engine: EngineApp) -> None:
    order = Order()
    await order.place(engine)
    assert (await n_create(engine, order.n_create(), None)).Status == 0
    rows = stored(engine)
    assert len(rows) == 1 and rows[0]["status"] == "processed"
    made = rows[0]["control_id"]
    assert made.startswith("1.2.") and step(engine, made) is not None
    assert item_status(engine, order) == "IN PROGRESS"


async def test_with_engine_key_the_step_record_is_sealed_and_rotated(tmp_path: Path, ris: FakeRis) -> None:
    import base64

    from engine.runtime.app import default_registry
    from engine.runtime.config import load_config
    from engine.store import crypto, rekey
    from tests.conftest import ROOT, engine_env

    key = base64.b64encode(b"K" * 32).decode()
    env = engine_env(tmp_path) | {"RIS_STATUS_PORT": str(ris.port), "ENGINE_KEY": key}
    registry = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=env), registry)
    await app.start()
    try:
        order = Order()
        await order.place(app)
        uid = order.mpps_uid()
        assert (await n_create(app, order.n_create(), uid)).Status == 0
        assert (await n_set(app, order.completed(), uid)).Status == 0  # reads the sealed record back
        performed = step(app, uid)
        assert performed is not None and performed["dataset_json"].startswith("ek1:")
        assert "Doe" not in performed["dataset_json"] and performed["status"] == "COMPLETED"
        assert app.db is not None
        counts = await asyncio.to_thread(rekey.key_counts, app.db)
        assert counts["performed_steps.dataset_json"] == {crypto.key_id(b"K" * 32).hex(): 1}
    finally:
        await app.stop()
        crypto.configure(None)


async def test_an_undecodable_dataset_is_stored_and_refused(
    engine: EngineApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The modality's bytes are not a dataset (an element claims more bytes than follow): the unit
    is still stored as received (the bytes, base64 in the envelope) and answered 0x0110."""
    import base64

    import pynetdicom.association

    garbage = b"\x10\x00\x10\x00\x50\x4e\xff\x7f" + b"Doe^Jane"  # (0010,0010) PN, length 0x7fff
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *_args, **_kw: garbage)
    status = await n_create(engine, Order().n_create(), "1.2.826.0.1.3680043.8.497.1")
    assert status.Status == 0x0110
    rows = stored(engine)
    assert len(rows) == 1 and rows[0]["status"] == "error"
    assert base64.b64decode(json.loads(rows[0]["raw"])["undecodable"]) == garbage


async def test_the_banner_shows_the_mpps_channel_on_the_dicom_endpoint(engine: EngineApp) -> None:
    """pacs-studies listens nowhere itself: `engine run` names it with the SCP's address."""
    shown = dict(engine.endpoints())
    scp = next(ep for what, ep in shown.items() if what.startswith("DICOM "))
    mpps = [what for what in shown if what.startswith("pacs-studies")]
    assert mpps == [f"pacs-studies (MPPS on {next(w for w in shown if w.startswith('DICOM '))})"]
    assert shown[mpps[0]] == scp and scp.port == engine.scp.port


async def test_a_cancelled_order_is_not_completed_by_the_final_n_set(engine: EngineApp, ris: FakeRis) -> None:
    """The RIS cancels the order while the modality works: the N-SET COMPLETED is taken (the step is
    what the modality did) but the item stays CANCELLED and the RIS is not told the order completed."""
    order = Order()
    await order.place(engine)
    uid = order.mpps_uid()
    assert (await n_create(engine, order.n_create(), uid)).Status == 0
    cancel = order.orm().replace(b"ORC|NW|", b"ORC|CA|").replace(b"||SC||", b"||CA||")
    cancel = cancel.replace(f"|C{order.tag}|".encode(), f"|X{order.tag}|".encode())  # its own MSH-10
    async with MLLPClient("127.0.0.1", engine.port_of("ris-orders"), read_timeout=30) as client:
        ack = Message.parse(await client.send(cancel))
    assert ack.get("MSA-1") == "AA", ack.to_er7()
    assert item_status(engine, order) == "CANCELLED"

    assert (await n_set(engine, order.completed(), uid)).Status == 0
    assert item_status(engine, order) == "CANCELLED"
    performed = step(engine, uid)
    assert performed is not None and performed["status"] == "COMPLETED"
    n_set_row = stored(engine)[-1]
    assert n_set_row["message_type"] == "MPPS^N-SET" and n_set_row["status"] == "processed"
    assert engine.db is not None
    with engine.db.connect() as conn:
        queued = conn.execute(select(DELIVERIES.c.destination).where(DELIVERIES.c.message_id == n_set_row["id"]))
        destinations = sorted(queued.scalars())
    assert "ris" not in destinations  # no SC^CM for a cancelled order (its images still make an ImagingStudy)
    got = await ris.wait_for(1)
    assert [status_of(m) for m in got] == [("SC", "IP")]
