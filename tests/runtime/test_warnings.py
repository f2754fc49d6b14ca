"""Optional data outside its rules is dropped with a warning, not refused: the sender gets AA with
one ERR segment of severity W per warning, the message is stored with its warnings, and the
worklist item exists without the bad values. Over MLLP to the shipped configuration."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.runtime.app import EngineApp
from engine.store.models import Message as StoredMessage

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__


def order(**fields: str) -> bytes:
    msg = Message.parse((ROOT / "samples" / "hl7" / "orm_o01_ct.hl7").read_bytes())
    for path, value in fields.items():
        msg.set(path.replace("_", "-", 1).replace("_", "."), value, raw=True)
    return msg.encode()


def find(port: int, accession: str) -> list[Dataset]:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    q = Dataset()
    q.AccessionNumber = accession
    q.PatientSex = ""
    q.PatientName = ""
    q.RequestedProcedurePriority = ""
    q.ScheduledProcedureStepSequence = [Dataset()]
    found = [ds for status, ds in assoc.send_c_find(q, ModalityWorklistInformationFind) if status.Status == 0xFF00]
    assoc.release()
    return found


async def test_bad_optional_values_are_dropped_with_warnings(running_engine: EngineApp) -> None:
    app = running_engine
    body = order(ORC_7_6="3", PID_8="M-", MSH_10="W-1")
    async with MLLPClient("127.0.0.1", app.port_of("ris-orders"), read_timeout=20) as client:
        ack = Message.parse(await client.send(body))
    assert ack.get("MSA-1") == "AA"
    errs = ack.segments("ERR")
    assert {(e.fields[4], e.fields[2].split("^")[0]) for e in errs} >= {("W", "ORC"), ("W", "PID")}, ack.text
    assert all(e.fields[4] == "W" for e in errs)
    assert app.db is not None
    with app.db.connect() as conn:
        (row,) = conn.execute(select(MESSAGES).where(MESSAGES.c.control_id == "W-1")).mappings().all()
    assert row["status"] == "processed"
    stored = json.loads(row["warnings"])
    assert {w["location"].split(".")[0] for w in stored} >= {"ORC-7", "PID-8"}
    assert all("M-" not in w["text"] for w in stored)  # field names, never values
    assert app.scp is not None
    (item,) = find(int(app.scp.port), "ACC1001")
    assert item.PatientSex == ""
    assert item.RequestedProcedurePriority == "ROUTINE"  # ORC-7.6 was garbage: the chain's OBR-27.6


async def test_undeclared_latin1_is_read_with_a_warning(running_engine: EngineApp) -> None:
    app = running_engine
    body = order(MSH_10="W-2", PID_5="Müller^Jürgen").decode("utf-8").encode("latin-1")
    async with MLLPClient("127.0.0.1", app.port_of("ris-orders"), read_timeout=20) as client:
        ack = Message.parse(await client.send(body))
    assert ack.get("MSA-1") == "AA"
    assert any(e.fields[4] == "W" and e.fields[2].startswith("MSH^1^18") for e in ack.segments("ERR")), ack.text
    assert app.scp is not None
    (item,) = find(int(app.scp.port), "ACC1001")
    assert str(item.PatientName) == "Müller^Jürgen"
