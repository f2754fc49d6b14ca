"""RIS orders to the modality worklist, end to end through the shipped configuration.

HL7 goes in over MLLP to the `ris-orders` channel (the engine's MLLPClient, and python-hl7's
asyncio client as an independent sender); the worklist comes out of the DICOM SCP, read with
dcmtk's findscu (/usr/bin/findscu: the `findscu` on PATH may be pynetdicom's app) and with a
pynetdicom SCU. Messages are variants of the samples in samples/hl7, with control ids, order
numbers, accession numbers and patient ids unique to each test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from sqlalchemy import select

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.mapping.formats import accession_uid
from engine.runtime.app import EngineApp
from engine.store.models import Message as StoredMessage
from engine.store.worklist import WorklistItem

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
FINDSCU = Path("/usr/bin/findscu")
MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]
ITEMS = WorklistItem.__table__  # type: ignore[attr-defined]
SPS = "ScheduledProcedureStepSequence"
CHANNEL = "ris-orders"

_counter = itertools.count(1)


# -- building messages from the samples -----------------------------------------------------------------


def new_tag() -> str:
    """Ten digits unique to one order (accession 'A' + tag fits SH's 16 characters)."""
    return f"{uuid.uuid4().int % 9_000_000 + 1_000_000}{next(_counter) % 1000:03d}"  # no leading zero (UIDs)


def new_control_id() -> str:
    return f"E2E{new_tag()}"


def set_field(text: str, path: str, value: str) -> str:
    """Set SEG-n or SEG-n.c in every occurrence of the segment (first repetition; ER7 delimiters)."""
    seg, _, rest = path.partition("-")
    field_s, _, comp_s = rest.partition(".")
    n = int(field_s)
    out = []
    for line in text.split("\r"):
        if line.startswith(seg + "|"):
            fields = line.split("|")
            idx = n - 1 if seg == "MSH" else n  # MSH-1 is the field separator itself
            fields += [""] * (idx + 1 - len(fields))
            if comp_s:
                comps = fields[idx].split("~")[0].split("^")
                c = int(comp_s)
                comps += [""] * (c - len(comps))
                comps[c - 1] = value
                fields[idx] = "^".join(comps).rstrip("^")
            else:
                fields[idx] = value
            line = "|".join(fields)
        out.append(line)
    return "\r".join(out)


def drop_segments(text: str, *names: str) -> str:
    return "\r".join(line for line in text.split("\r") if line[:3] not in names)


def variant(
    sample: str,
    replace: Mapping[str, str] | None = None,
    fields: Mapping[str, str] | None = None,
    drop: tuple[str, ...] = (),
    encoding: str = "latin-1",
) -> bytes:
    """A sample with strings replaced, fields set and segments dropped, encoded for the wire."""
    source = "latin-1" if sample == "orm_latin1.hl7" else "ascii"
    text = (SAMPLES / sample).read_bytes().decode(source)
    for old, new in (replace or {}).items():
        assert old in text, f"{old!r} not in {sample}"
        text = text.replace(old, new)
    for path, value in (fields or {}).items():
        text = set_field(text, path, value)
    if drop:
        text = drop_segments(text, *drop)
    return text.encode(encoding)


class Order:
    """One order made from samples/hl7/orm_o01_ct.hl7, with its own numbers."""

    def __init__(self, patient: str | None = None) -> None:
        self.tag = new_tag()
        self.placer = f"PL{self.tag}"
        self.filler = f"FL{self.tag}"
        self.accession = f"A{self.tag}"
        self.procedure = f"RP{self.tag}"
        self.sps_id = f"S{self.tag}"
        self.patient = patient or f"P{self.tag}"
        self.study_uid = f"1.2.826.0.1.3680043.8.498.{self.tag}"

    def message(
        self,
        control: str = "NW",
        status: str = "SC",
        *,
        when: str | None = None,
        patient: str | None = None,
        name: str | None = None,
        zds: bool = True,
        control_id: str | None = None,
        fields: Mapping[str, str] | None = None,
        charset: str | None = None,
        encoding: str = "latin-1",
    ) -> bytes:
        replace = {
            "|ORM0001|": f"|{control_id or new_control_id()}|",
            "PL1001": self.placer,
            "FL1001": self.filler,
            "ACC1001": self.accession,
            "RP1001": self.procedure,
            "SPS1001": self.sps_id,
            "100234^^^HOSP": f"{patient or self.patient}^^^HOSP",
            "1.2.826.0.1.3680043.8.498.1001": self.study_uid,
        }
        if name is not None:
            replace["Doe^Jane^Anne^^Mrs"] = name
        values = {"ORC-1": control, "ORC-5": status}
        if when is not None:
            values["ORC-7.4"] = when  # OBR-27 keeps the sample's time: ORC-7.4 comes first
        if charset is not None:
            values["MSH-18"] = charset
        values.update(fields or {})
        return variant("orm_o01_ct.hl7", replace, values, () if zds else ("ZDS",), encoding)


# -- MLLP -------------------------------------------------------------------------------------------------


async def send(app: EngineApp, body: bytes) -> Message:
    async with MLLPClient("127.0.0.1", app.port_of(CHANNEL), read_timeout=30) as client:
        return Message.parse(await client.send(body))


async def send_raw(app: EngineApp, body: bytes) -> bytes:
    async with MLLPClient("127.0.0.1", app.port_of(CHANNEL), read_timeout=30) as client:
        return await client.send(body)


async def send_python_hl7(app: EngineApp, body: bytes, encoding: str = "latin-1") -> hl7.Message:
    """python-hl7's asyncio MLLP client: an independent sender and ACK parser."""
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", app.port_of(CHANNEL), encoding=encoding)
    try:
        writer.writemessage(hl7.parse(body.decode(encoding)))
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), 30)
    finally:
        writer.close()
        await writer.wait_closed()


def assert_aa(ack: Message, control_id: str | None = None) -> None:
    assert ack.get("MSA-1") == "AA", ack.to_er7()
    if control_id is not None:
        assert ack.get("MSA-2") == control_id
    assert not ack.segments("ERR")


def assert_ae(ack: Message, code: int, location: str) -> None:
    """AE with ERR-3 = the table 0357 code and ERR-2 = the location (ERL: SEG^seq^field^rep[^comp])."""
    assert ack.get("MSA-1") == "AE", ack.to_er7()
    assert ack.get("ERR-3.1") == str(code), ack.to_er7()
    assert ack.get("ERR-3.3") == "HL70357"
    assert "^".join(ack.components("ERR-2")) == location, ack.to_er7()


def control_id_of(body: bytes) -> str:
    return body.split(b"\r", 1)[0].split(b"|")[9].decode()


# -- the store --------------------------------------------------------------------------------------------


def stored(app: EngineApp, control_id: str) -> list[dict[str, Any]]:
    assert app.db is not None
    with app.db.connect() as conn:
        rows = conn.execute(
            select(MESSAGES).where(MESSAGES.c.control_id == control_id).order_by(MESSAGES.c.id)
        ).mappings()
        return [dict(r) for r in rows]


def rows(app: EngineApp, **where: str) -> list[dict[str, Any]]:
    """Worklist rows (all statuses), each with its parsed dataset."""
    assert app.db is not None
    query = select(ITEMS).order_by(ITEMS.c.id)
    for column, value in where.items():
        query = query.where(ITEMS.c[column] == value)
    with app.db.connect() as conn:
        found = [dict(r) for r in conn.execute(query).mappings()]
    for row in found:
        row["dataset"] = json.loads(row["dataset_json"])
    return found


# -- C-FIND with pynetdicom -------------------------------------------------------------------------------

RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
)
SPS_RETURN_KEYS = (
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepStatus",
)


def mwl_query(sps: Mapping[str, str] | None = None, **top: str) -> Dataset:
    """An identifier with the usual return keys (zero length) and the given matching keys."""
    ds = Dataset()
    if "SpecificCharacterSet" in top:
        ds.SpecificCharacterSet = top.pop("SpecificCharacterSet")
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, "")
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    step = Dataset()
    for keyword in SPS_RETURN_KEYS:
        setattr(step, keyword, "")
    for keyword, value in (sps or {}).items():
        setattr(step, keyword, value)
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def _c_find(port: int, query: Dataset) -> tuple[list[Dataset], int]:
    ae = AE(ae_title="E2ESCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    answers: list[Dataset] = []
    final = -1
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            assert status is not None and "Status" in status, "no C-FIND response (association aborted?)"
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None
                answers.append(identifier)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return answers, final


async def mwl(app: EngineApp, sps: Mapping[str, str] | None = None, **top: str) -> list[Dataset]:
    """Answers of the worklist SCP to one query (pynetdicom SCU); the final status must be Success."""
    answers, final = await asyncio.to_thread(_c_find, app.scp.port, mwl_query(sps, **top))
    assert final == 0x0000
    return answers


def accessions(answers: list[Dataset]) -> list[str]:
    return sorted(str(a.AccessionNumber) for a in answers)


# -- C-FIND with dcmtk findscu ----------------------------------------------------------------------------


_DUMP_LINE = re.compile(r"^I: +\(([0-9a-f]{4}),([0-9a-f]{4})\) \w\w \[(.*)\] +# +\d+, *\d+ (\w+)$", re.MULTILINE)


class FindResult:
    def __init__(self, answers: list[Dataset], log: str) -> None:
        self.answers = answers  # the rsp*.dcm files written by --extract, read with pydicom
        self.log = log  # findscu's own dump (+sr -v), decoded as UTF-8
        # findscu's rendering of each answer: keyword -> value (sequence items flattened)
        blocks = re.split(r"Find Response: \d+ \(Pending\)", log)[1:]
        self.dumps = [{m[3]: m[2].rstrip() for m in _DUMP_LINE.findall(block)} for block in blocks]


def find_keys(sps: Mapping[str, str] | None = None, **top: str) -> list[str]:
    """findscu -k arguments: the usual return keys, with `top` / `sps` values as matching keys."""
    keys = []
    if "SpecificCharacterSet" in top:
        value = top.pop("SpecificCharacterSet")
        keys.append(f"SpecificCharacterSet={value}" if value else "SpecificCharacterSet")
    values = dict.fromkeys(RETURN_KEYS, "") | top
    keys += [f"{k}={v}" if v else k for k, v in values.items()]
    step = dict.fromkeys(SPS_RETURN_KEYS, "") | dict(sps or {})
    keys += [f"{SPS}[0].{k}={v}" if v else f"{SPS}[0].{k}" for k, v in step.items()]
    return keys


async def findscu(
    app: EngineApp, out: Path, sps: Mapping[str, str] | None = None, *, encoding: str = "utf-8", **top: str
) -> FindResult:
    """One C-FIND with dcmtk's findscu; answers both as written files and as findscu printed them.

    `encoding`: how the -k values go on the command line (findscu sends their bytes as they are)
    and how its dump is read (it prints the answers' bytes as they came).
    """
    if not FINDSCU.exists():
        pytest.skip("dcmtk's findscu is not installed at /usr/bin/findscu")
    out.mkdir(parents=True, exist_ok=True)
    args = [str(FINDSCU), "-v", "+sr", "-W", "-aet", "E2EFIND", "-aec", "ENGINE", "-X", "-od", str(out)]
    for key in find_keys(sps, **top):
        args += ["-k", key]
    args += ["127.0.0.1", str(app.scp.port)]
    argv = [a.encode(encoding) for a in args]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=60)
    log = (done.stdout + done.stderr).decode(encoding, errors="replace")
    assert done.returncode == 0, log
    assert "Received Final Find Response (Success)" in log, log
    result = FindResult([dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], log)
    assert len(result.dumps) == len(result.answers)
    for dump, answer in zip(result.dumps, result.answers, strict=True):
        assert dump.get("AccessionNumber", "") == str(answer.get("AccessionNumber", ""))
    return result


# -- create -----------------------------------------------------------------------------------------------


async def test_new_order_is_queryable_with_the_right_keys(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    order = Order()
    body = order.message("NW", "SC")
    ack = await send(app, body)
    assert_aa(ack, control_id_of(body))
    assert ack.message_type == "ACK^O01"
    (row,) = stored(app, control_id_of(body))
    assert row["status"] == "processed"

    def check(a: Dataset) -> None:
        assert str(a.PatientName) == "Doe^Jane^Anne^Mrs"
        assert a.PatientID == order.patient
        assert a.PatientBirthDate == "19800512" and a.PatientSex == "F"
        assert a.AccessionNumber == order.accession
        assert a.RequestedProcedureID == order.procedure
        assert a.RequestedProcedureDescription == "CT Head without contrast"
        assert a.StudyInstanceUID == order.study_uid  # ZDS-1 wins over the derived UID
        (step,) = a.ScheduledProcedureStepSequence
        assert step.Modality == "CT"
        assert step.ScheduledStationAETitle == "CT1"
        assert step.ScheduledProcedureStepStartDate == "20261125"
        assert step.ScheduledProcedureStepStartTime == "100000"
        assert step.ScheduledProcedureStepID == order.sps_id
        assert step.ScheduledProcedureStepStatus == "SCHEDULED"

    # IHE RAD-5 patient query, each key alone, then the broad query
    for key, value in (
        ("AccessionNumber", order.accession),
        ("PatientID", order.patient),
        ("RequestedProcedureID", order.procedure),
        ("StudyInstanceUID", order.study_uid),
        ("PatientName", "Doe^Jane^Anne^Mrs"),
    ):
        (answer,) = await mwl(app, **{key: value})
        check(answer)
    broad = {"ScheduledProcedureStepStartDate": "20261125", "Modality": "CT", "ScheduledStationAETitle": "CT1"}
    (answer,) = await mwl(app, broad)
    check(answer)
    assert await mwl(app, {**broad, "ScheduledStationAETitle": "CT2"}) == []
    assert await mwl(app, {**broad, "Modality": "MR"}) == []
    assert await mwl(app, AccessionNumber=order.accession + "0") == []

    for n, (sps, top) in enumerate([({}, {"PatientName": "Doe^Jane^Anne^Mrs"}), (broad, {})]):
        found = await findscu(app, tmp_path / str(n), sps, **top)
        (answer,) = found.answers
        check(answer)
        (dump,) = found.dumps  # as findscu printed it
        assert dump["PatientName"] == "Doe^Jane^Anne^Mrs" and dump["PatientID"] == order.patient
        assert dump["AccessionNumber"] == order.accession and dump["StudyInstanceUID"] == order.study_uid
        assert dump["ScheduledStationAETitle"] == "CT1" and dump["ScheduledProcedureStepStartTime"] == "100000"


async def test_omi_o23_from_python_hl7_is_queryable(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    tag = new_tag()
    control_id = new_control_id()
    body = variant(
        "omi_o23.hl7",
        {
            "|OMI0001|": f"|{control_id}|",
            "PL3001": f"PL{tag}",
            "FL3001": f"FL{tag}",
            "ACC3001": f"A{tag}",
            "RP3001": f"RP{tag}",
            "SPS3001": f"S{tag}",
            "100236^^^HOSP": f"P{tag}^^^HOSP",
            "1.2.826.0.1.3680043.8.498.3001": f"1.2.826.0.1.3680043.8.498.{tag}",
        },
    )
    ack = await send_python_hl7(app, body)
    assert str(ack.segment("MSA")[1]) == "AA"
    assert str(ack.segment("MSA")[2]) == control_id
    assert str(ack.segment("MSH")[9]) == "ACK^O23^ACK"

    extra_sps = dict.fromkeys(
        ("ScheduledStationName", "ScheduledProcedureStepLocation", "ScheduledProcedureStepDescription"), ""
    )
    found = await findscu(app, tmp_path / "omi", extra_sps, AccessionNumber=f"A{tag}")
    assert found.dumps[0]["ScheduledStationAETitle"] == "MRI1"
    for answer in [*found.answers, *(await mwl(app, PatientID=f"P{tag}"))]:
        assert answer.AccessionNumber == f"A{tag}" and answer.PatientID == f"P{tag}"
        assert str(answer.PatientName) == "Smith^Alex"
        assert answer.RequestedProcedureID == f"RP{tag}"  # IPC-2 wins over OBR-19
        assert answer.StudyInstanceUID == f"1.2.826.0.1.3680043.8.498.{tag}"  # IPC-3
        assert answer.RequestedProcedureDescription == "MR Knee left"
        (step,) = answer.ScheduledProcedureStepSequence
        assert step.Modality == "MR" and step.ScheduledStationAETitle == "MRI1"  # IPC-9
        assert step.ScheduledProcedureStepStartDate == "20261125"
        assert step.ScheduledProcedureStepStartTime == "140000"
        assert step.ScheduledProcedureStepID == f"S{tag}"
        if "ScheduledStationName" in step:  # the findscu query asked for these
            assert step.ScheduledStationName == "MR1"
            assert step.ScheduledProcedureStepLocation == "MRIROOM1"
            assert step.ScheduledProcedureStepDescription == "MR Knee protocol"
    assert len(found.answers) == 1


async def test_study_uid_is_derived_from_the_accession_and_stable(running_engine: EngineApp) -> None:
    app = running_engine
    first = Order()
    assert_aa(await send(app, first.message(zds=False)))
    (answer,) = await mwl(app, AccessionNumber=first.accession)
    uid = str(answer.StudyInstanceUID)
    assert uid == accession_uid("2.25", first.accession)

    # an update without a UID keeps it; so does a resent NW under a new control id
    assert_aa(await send(app, first.message("XO", "SC", when="202611251130", zds=False)))
    assert_aa(await send(app, first.message("NW", "SC", zds=False)))
    (answer,) = await mwl(app, AccessionNumber=first.accession)
    assert answer.StudyInstanceUID == uid

    # another order (other order numbers) for the same accession: the same study
    same_accession = Order(patient=first.patient)
    same_accession.accession = first.accession
    assert_aa(await send(app, same_accession.message(zds=False)))
    answers = await mwl(app, AccessionNumber=first.accession)
    assert [a.StudyInstanceUID for a in answers] == [uid, uid]

    other = Order()
    assert_aa(await send(app, other.message(zds=False)))
    (answer,) = await mwl(app, AccessionNumber=other.accession)
    assert answer.StudyInstanceUID == accession_uid("2.25", other.accession) != uid
    assert len(rows(app)) == 3


# -- lifecycle --------------------------------------------------------------------------------------------


async def test_reschedule_moves_the_step_to_the_new_date(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    order = Order()
    assert_aa(await send(app, order.message("NW", "SC", when="202611251000")))
    (before,) = await mwl(app, {"ScheduledProcedureStepStartDate": "20261125"})
    assert before.AccessionNumber == order.accession

    body = order.message("XO", "SC", when="202611271430")
    assert_aa(await send(app, body), control_id_of(body))
    (after,) = await mwl(app, {"ScheduledProcedureStepStartDate": "20261127"})
    assert after.AccessionNumber == order.accession
    assert after.StudyInstanceUID == before.StudyInstanceUID
    step = after.ScheduledProcedureStepSequence[0]
    assert step.ScheduledProcedureStepStartTime == "143000"
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    assert await mwl(app, {"ScheduledProcedureStepStartDate": "20261125"}) == []
    found = await findscu(app, tmp_path / "a", {"ScheduledProcedureStepStartDate": "20261125"})
    assert found.answers == []
    found = await findscu(app, tmp_path / "b", {"ScheduledProcedureStepStartDate": "20261127"})
    assert [a.AccessionNumber for a in found.answers] == [order.accession]
    assert found.dumps[0]["ScheduledProcedureStepStartTime"] == "143000"
    assert len(rows(app)) == 1  # updated in place, not a second step


@pytest.mark.parametrize(
    ("control", "status", "step_status"),
    [("CA", "CA", "CANCELLED"), ("DC", "CA", "DISCONTINUED"), ("XO", "CM", "COMPLETED")],
)
async def test_cancel_discontinue_complete_take_the_item_off_the_worklist(
    running_engine: EngineApp, tmp_path: Path, control: str, status: str, step_status: str
) -> None:
    app = running_engine
    order, neighbour = Order(), Order()
    neighbour.patient = order.patient  # same patient, another order: must stay
    for o in (order, neighbour):
        assert_aa(await send(app, o.message("NW", "SC")))
    assert accessions(await mwl(app, PatientID=order.patient)) == sorted([order.accession, neighbour.accession])

    body = order.message(control, status)
    assert_aa(await send(app, body), control_id_of(body))
    assert await mwl(app, AccessionNumber=order.accession) == []
    assert accessions(await mwl(app, PatientID=order.patient)) == [neighbour.accession]
    found = await findscu(app, tmp_path / "f", AccessionNumber=order.accession)
    assert found.answers == []
    (row,) = rows(app, accession_number=order.accession)
    assert row["status"] == step_status
    (other,) = rows(app, accession_number=neighbour.accession)
    assert other["status"] == "SCHEDULED"


@pytest.mark.parametrize(("control", "status"), [("CA", "CA"), ("DC", "CA"), ("XO", "CM"), ("XO", "SC")])
async def test_change_to_an_unknown_order_is_refused_and_changes_nothing(
    running_engine: EngineApp, control: str, status: str
) -> None:
    app = running_engine
    known = Order()
    assert_aa(await send(app, known.message("NW", "SC")))
    before = rows(app)

    unknown = Order(patient=known.patient)
    body = unknown.message(control, status)
    ack = await send(app, body)
    assert_ae(ack, 204, "ORC^1^3^1")  # the filler order number names the order
    assert ack.get("MSA-2") == control_id_of(body)
    (row,) = stored(app, control_id_of(body))
    assert row["status"] == "error" and row["error_code"] == 204 and row["error_location"] == "ORC-3"

    # only a placer number: that is the one named
    body = unknown.message(control, status, fields={"ORC-3": "", "OBR-3": ""})
    assert_ae(await send(app, body), 204, "ORC^1^2^1")

    assert rows(app) == before
    (answer,) = await mwl(app, PatientID=known.patient)
    assert answer.AccessionNumber == known.accession
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "SCHEDULED"


@pytest.mark.parametrize("control", ["XO", "NW"])
async def test_update_that_moves_an_order_to_another_patient_is_refused(
    running_engine: EngineApp, control: str
) -> None:
    app = running_engine
    order = Order()
    assert_aa(await send(app, order.message("NW", "SC")))
    other_patient = f"Q{order.tag}"
    body = order.message(control, "SC", when="202611261000", patient=other_patient)
    ack = await send(app, body)
    assert ack.get("MSA-1") == "AE"
    assert ack.get("ERR-2.1") == "PID" and ack.get("ERR-2.3") == "3"
    assert ack.get("ERR-3.1") == "207"
    assert stored(app, control_id_of(body))[0]["status"] == "error"

    assert await mwl(app, PatientID=other_patient) == []
    (answer,) = await mwl(app, AccessionNumber=order.accession)
    assert answer.PatientID == order.patient
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20261125"  # not applied
    assert len(rows(app)) == 1


async def test_one_bad_order_refuses_the_whole_message(running_engine: EngineApp) -> None:
    """Two orders in one message, the second one invalid: neither is applied."""
    app = running_engine
    tag, control_id = new_tag(), new_control_id()
    replace = {"|ORM0002|": f"|{control_id}|", "100235^^^HOSP": f"P{tag}^^^HOSP", "ORC|NW|PL2002": "ORC|NW|PL2002"}
    for n in ("2001", "2002"):
        for prefix, new in (("PL", "PL"), ("FL", "FL"), ("ACC", "A"), ("RP", "RP"), ("SPS", "S")):
            replace[f"{prefix}{n}"] = f"{new}{tag}{n[-1]}"
    body = variant("orm_o01_two_orders.hl7", replace)
    second_orc = f"ORC|NW|PL{tag}2^RIS|FL{tag}2^PACS||SC|"
    assert second_orc.encode() in body
    ack = await send(app, body.replace(second_orc.encode(), second_orc.replace("|SC|", "|CM|").encode()))
    assert_ae(ack, 103, "ORC^1^1^1")
    assert rows(app) == []
    assert await mwl(app, PatientID=f"P{tag}") == []

    ack = await send(app, body.replace(control_id.encode(), f"{control_id}B".encode()))
    assert_aa(ack)
    assert accessions(await mwl(app, PatientID=f"P{tag}")) == [f"A{tag}1", f"A{tag}2"]


async def test_a_refused_message_is_not_a_duplicate_and_its_fix_goes_through(running_engine: EngineApp) -> None:
    """Refused messages are processed again when resent (the cause may have been fixed meanwhile)."""
    app = running_engine
    order = Order()
    control_id = new_control_id()
    bad = order.message("NW", "SC", control_id=control_id, fields={"PID-3": ""})
    first = await send_raw(app, bad)
    again = await send_raw(app, bad)
    assert first.split(b"\r")[1:] == again.split(b"\r")[1:]  # the same MSA and ERR (a new ACK header)
    assert_ae(Message.parse(again), 101, "PID^1^3^1^1")
    assert rows(app) == []
    fixed = order.message("NW", "SC", control_id=control_id)  # corrected, under the same MSH-10
    assert_aa(await send(app, fixed), control_id)
    assert accessions(await mwl(app, PatientID=order.patient)) == [order.accession]
    assert [(r["status"], r["flags"]) for r in stored(app, control_id)] == [
        ("error", ""),
        ("error", ""),
        ("processed", "control-id-reused"),
    ]
    assert await send_raw(app, fixed) == await send_raw(app, fixed)  # now a plain resend: the stored AA
    assert len(rows(app)) == 1


@pytest.mark.parametrize(("control", "status"), [("NW", "CM"), ("XO", "CA"), ("ZZ", "SC"), ("CA", "SC")])
async def test_order_control_and_status_pair_not_in_the_map_is_refused(
    running_engine: EngineApp, control: str, status: str
) -> None:
    app = running_engine
    existing = Order()
    assert_aa(await send(app, existing.message("NW", "SC")))
    before = rows(app)

    for order in (existing, Order()):  # on an existing order and on a new one
        body = order.message(control, status, when="202611300800")
        ack = await send(app, body)
        assert_ae(ack, 103, "ORC^1^1^1")
        assert ack.get("ERR-1.4.1") == "103"  # v2.3.1 sender: ERR-1 (ELD) carries the code too
        assert stored(app, control_id_of(body))[0]["error_code"] == 103
    assert rows(app) == before
    (answer,) = await mwl(app, AccessionNumber=existing.accession)
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20261125"


# -- patients ---------------------------------------------------------------------------------------------


async def test_adt_a08_updates_the_open_items_of_the_patient(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    open_order, cancelled, stranger = Order(), Order(), Order()
    cancelled.patient = open_order.patient
    for o in (open_order, cancelled, stranger):
        assert_aa(await send(app, o.message("NW", "SC")))
    assert_aa(await send(app, cancelled.message("CA", "CA")))

    control_id = new_control_id()
    a08 = variant(
        "adt_a08.hl7",
        {"|ADT0001|": f"|{control_id}|", "100234^^^HOSP": f"{open_order.patient}^^^HOSP"},
        {"PID-5": "Doe-Miller^Janet^Anne^^Mrs", "PID-7": "19800513", "PID-8": "O"},
    )
    ack = await send(app, a08)
    assert_aa(ack, control_id)
    assert ack.message_type == "ACK^A08"

    (answer,) = await mwl(app, PatientID=open_order.patient)
    assert answer.AccessionNumber == open_order.accession
    assert str(answer.PatientName) == "Doe-Miller^Janet^Anne^Mrs"
    assert answer.PatientBirthDate == "19800513" and answer.PatientSex == "O"
    assert accessions(await mwl(app, PatientName="DOE-MILLER*")) == [open_order.accession]
    assert accessions(await mwl(app, PatientName="Doe^Jane^Anne^Mrs")) == [stranger.accession]
    found = await findscu(app, tmp_path / "a08", PatientName="Doe-Miller*")
    assert [str(a.PatientName) for a in found.answers] == ["Doe-Miller^Janet^Anne^Mrs"]
    assert [d["PatientBirthDate"] for d in found.dumps] == ["19800513"]

    (closed,) = rows(app, accession_number=cancelled.accession)
    assert closed["status"] == "CANCELLED" and closed["dataset"]["PatientName"] == "Doe^Jane^Anne^Mrs"
    (untouched,) = rows(app, accession_number=stranger.accession)
    assert untouched["dataset"]["PatientBirthDate"] == "19800512"


async def test_adt_a40_moves_the_items_to_the_surviving_patient(running_engine: EngineApp) -> None:
    app = running_engine
    first, second = Order(), Order()
    second.patient = first.patient
    prior = first.patient
    survivor = f"M{first.tag}"
    for o in (first, second):
        assert_aa(await send(app, o.message("NW", "SC")))

    control_id = new_control_id()
    a40 = variant(
        "adt_a40.hl7",
        {"|ADT0002|": f"|{control_id}|", "100234^^^HOSP": f"{survivor}^^^HOSP", "MRG|999001^": f"MRG|{prior}^"},
        {"PID-5": "Doe^Jane^Anne^^Mrs"},
    )
    ack = await send_python_hl7(app, a40)
    assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == control_id

    assert await mwl(app, PatientID=prior) == []
    answers = await mwl(app, PatientID=survivor)
    assert accessions(answers) == sorted([first.accession, second.accession])
    assert {str(a.PatientName) for a in answers} == {"Doe^Jane^Anne^Mrs"}
    assert {r["patient_id"] for r in rows(app)} == {survivor}

    # orders now follow the survivor: an update under the prior id is refused
    ack = await send(app, first.message("XO", "SC", patient=prior))
    assert ack.get("MSA-1") == "AE" and ack.get("ERR-2.1") == "PID"
    assert_aa(await send(app, first.message("XO", "SC", when="202611261000", patient=survivor)))
    (answer,) = await mwl(app, {"ScheduledProcedureStepStartDate": "20261126"})
    assert answer.AccessionNumber == first.accession and answer.PatientID == survivor


# -- matching ---------------------------------------------------------------------------------------------


async def test_patient_name_wildcards(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    names = {
        "Doe^Jane^Anne^^Mrs": Order(),
        "DOE^JOHN": Order(),
        "Roe^Richard^^^Mr": Order(),
        "Moe^Anna": Order(),
        "Smith^Joe": Order(),
        "Doerr^Hans": Order(),
        "Odoe^Ola": Order(),
    }
    for name, order in names.items():
        assert_aa(await send(app, order.message(name=name)))

    def acc(*wanted: str) -> list[str]:
        return sorted(names[n].accession for n in wanted)

    assert accessions(await mwl(app, PatientName="DOE*")) == acc("Doe^Jane^Anne^^Mrs", "DOE^JOHN", "Doerr^Hans")
    assert accessions(await mwl(app, PatientName="doe^*")) == acc("Doe^Jane^Anne^^Mrs", "DOE^JOHN")
    expected = acc("Doe^Jane^Anne^^Mrs", "DOE^JOHN", "Roe^Richard^^^Mr", "Moe^Anna", "Doerr^Hans")
    assert accessions(await mwl(app, PatientName="?oe*")) == expected
    assert accessions(await mwl(app, PatientName="?OE^J*")) == acc("Doe^Jane^Anne^^Mrs", "DOE^JOHN")
    assert accessions(await mwl(app, PatientName="*^jo?n")) == acc("DOE^JOHN")
    assert accessions(await mwl(app, PatientName="SMITH")) == []  # no wildcard: the whole name
    assert accessions(await mwl(app, PatientName="Smith^Joe")) == acc("Smith^Joe")

    found = await findscu(app, tmp_path / "w", PatientName="?oe*")
    assert accessions(found.answers) == expected
    assert "Roe^Richard^^Mr" in [d["PatientName"] for d in found.dumps]


async def test_date_and_time_ranges(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    slots = ["202611240800", "202611251000", "202611251600", "202611261430", "202611261600", "202612010800"]
    orders = {slot: Order() for slot in slots}
    for slot, order in orders.items():
        assert_aa(await send(app, order.message(when=slot)))

    def acc(*wanted: str) -> list[str]:
        return sorted(orders[s].accession for s in wanted)

    def sps(date: str, time: str = "") -> dict[str, str]:
        return {"ScheduledProcedureStepStartDate": date, "ScheduledProcedureStepStartTime": time}

    assert accessions(await mwl(app, sps("20261125-20261126"))) == acc(*slots[1:5])
    assert accessions(await mwl(app, sps("-20261130"))) == acc(*slots[:5])
    assert accessions(await mwl(app, sps("20261126-"))) == acc(*slots[3:])
    assert accessions(await mwl(app, sps("20261125"))) == acc(*slots[1:3])
    assert accessions(await mwl(app, sps("20261125", "0900-1100"))) == acc("202611251000")
    # combined range: from 25 Nov 12:00 to 26 Nov 15:00 (not 12:00-15:00 on each day)
    assert accessions(await mwl(app, sps("20261125-20261126", "1200-1500"))) == acc("202611251600", "202611261430")
    assert accessions(await mwl(app, sps("20261202-20261231"))) == []

    found = await findscu(app, tmp_path / "r", sps("20261125-20261126", "1200-1500"))
    assert accessions(found.answers) == acc("202611251600", "202611261430")
    starts = sorted((d["ScheduledProcedureStepStartDate"], d["ScheduledProcedureStepStartTime"]) for d in found.dumps)
    assert starts == [("20261125", "160000"), ("20261126", "143000")]
    found = await findscu(app, tmp_path / "open", sps("-20261130"))
    assert accessions(found.answers) == acc(*slots[:5])


# -- character sets ---------------------------------------------------------------------------------------


async def test_latin1_message_gives_correct_names(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    tag, control_id = new_tag(), new_control_id()
    body = variant(
        "orm_latin1.hl7",
        {
            "|ORM0003|": f"|{control_id}|",
            "PL4001": f"PL{tag}",
            "FL4001": f"FL{tag}",
            "ACC4001": f"A{tag}",
            "RP4001": f"RP{tag}",
            "SPS4001": f"S{tag}",
            "100237^^^HOSP": f"P{tag}^^^HOSP",
        },
    )
    assert "Müller".encode("latin-1") in body and "Müller".encode() not in body
    raw_ack = await send_raw(app, body)
    ack = Message.parse(raw_ack)
    assert_aa(ack, control_id)
    assert ack.get("MSH-18") == "8859/1"  # answered in the charset it came in

    (answer,) = await mwl(app, PatientName="MÜLLER*", ReferringPhysicianName="", SpecificCharacterSet="ISO_IR 192")
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName) == "Müller^Jürgen^^Hr"
    assert str(answer.ReferringPhysicianName) == "Weiß^Käthe^^Dr"
    assert answer.AccessionNumber == f"A{tag}"
    (answer,) = await mwl(app, PatientID=f"P{tag}", SpecificCharacterSet="ISO_IR 100")
    assert answer.SpecificCharacterSet == "ISO_IR 100" and str(answer.PatientName) == "Müller^Jürgen^^Hr"
    (answer,) = await mwl(app, PatientName="m?ller^j*")  # no charset asked: UTF-8 answer
    assert answer.SpecificCharacterSet == "ISO_IR 192" and str(answer.PatientName) == "Müller^Jürgen^^Hr"

    found = await findscu(
        app, tmp_path / "l1", PatientName="M?LLER*", SpecificCharacterSet="", ReferringPhysicianName=""
    )
    (answer,) = found.answers
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName) == "Müller^Jürgen^^Hr" and str(answer.ReferringPhysicianName) == "Weiß^Käthe^^Dr"
    (dump,) = found.dumps
    assert dump["SpecificCharacterSet"] == "ISO_IR 192"
    assert dump["PatientName"] == "Müller^Jürgen^^Hr" and dump["ReferringPhysicianName"] == "Weiß^Käthe^^Dr"

    # a Latin-1 query (the name in ISO 8859-1 bytes on the wire) gets a Latin-1 answer
    (answer,) = await mwl(app, PatientName="MÜLLER^J*", SpecificCharacterSet="ISO_IR 100")
    assert answer.SpecificCharacterSet == "ISO_IR 100" and answer.AccessionNumber == f"A{tag}"
    found = await findscu(
        app, tmp_path / "l2", PatientName="MÜLLER*", SpecificCharacterSet="ISO_IR 100", encoding="latin-1"
    )
    (answer,) = found.answers
    assert answer.SpecificCharacterSet == "ISO_IR 100" and str(answer.PatientName) == "Müller^Jürgen^^Hr"
    assert found.dumps[0]["PatientName"] == "Müller^Jürgen^^Hr"


async def test_utf8_message_gives_correct_names(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    polish, japanese = Order(), Order()
    for order, name in ((polish, "Wałęsa^Łukasz"), (japanese, "山田^太郎")):
        body = order.message(name=name, charset="UNICODE UTF-8", encoding="utf-8")
        assert name.encode() in body
        assert_aa(await send(app, body), control_id_of(body))

    for asked in ("", "ISO_IR 100", "ISO_IR 192"):  # Latin-1 cannot hold these names: always UTF-8
        extra = {"SpecificCharacterSet": asked} if asked else {}
        (answer,) = await mwl(app, PatientID=polish.patient, **extra)
        assert answer.SpecificCharacterSet == "ISO_IR 192"
        assert str(answer.PatientName) == "Wałęsa^Łukasz"
    (answer,) = await mwl(app, PatientName="WAŁĘSA*", SpecificCharacterSet="ISO_IR 192")
    assert answer.AccessionNumber == polish.accession
    (answer,) = await mwl(app, PatientName="山田*", SpecificCharacterSet="ISO_IR 192")
    assert answer.AccessionNumber == japanese.accession and str(answer.PatientName) == "山田^太郎"

    found = await findscu(app, tmp_path / "u8", SpecificCharacterSet="")
    expected = {polish.accession: ("ISO_IR 192", "Wałęsa^Łukasz"), japanese.accession: ("ISO_IR 192", "山田^太郎")}
    assert {str(a.AccessionNumber): (a.SpecificCharacterSet, str(a.PatientName)) for a in found.answers} == expected
    assert {d["AccessionNumber"]: (d["SpecificCharacterSet"], d["PatientName"]) for d in found.dumps} == expected
    found = await findscu(app, tmp_path / "q", PatientName="山田*", SpecificCharacterSet="ISO_IR 192")
    assert [(d["AccessionNumber"], d["PatientName"]) for d in found.dumps] == [(japanese.accession, "山田^太郎")]
    found = await findscu(app, tmp_path / "q2", PatientName="wałęsa^ł*", SpecificCharacterSet="ISO_IR 192")
    assert accessions(found.answers) == [polish.accession]


# -- messages ---------------------------------------------------------------------------------------------


async def test_several_orders_in_one_message_give_several_items(running_engine: EngineApp, tmp_path: Path) -> None:
    app = running_engine
    tag, control_id = new_tag(), new_control_id()
    replace = {"|ORM0002|": f"|{control_id}|", "100235^^^HOSP": f"P{tag}^^^HOSP"}
    for n in ("2001", "2002"):
        for prefix, new in (("PL", "PL"), ("FL", "FL"), ("ACC", "A"), ("RP", "RP"), ("SPS", "S")):
            replace[f"{prefix}{n}"] = f"{new}{tag}{n[-1]}"
    assert_aa(await send(app, variant("orm_o01_two_orders.hl7", replace)), control_id)

    answers = await mwl(app, PatientID=f"P{tag}")
    found = await findscu(app, tmp_path / "two", PatientID=f"P{tag}")
    for got in (answers, found.answers):
        by_acc = {str(a.AccessionNumber): a for a in got}
        assert sorted(by_acc) == [f"A{tag}1", f"A{tag}2"]
        xr, us = by_acc[f"A{tag}1"], by_acc[f"A{tag}2"]
        assert xr.RequestedProcedureDescription == "XR Chest 2 views" and xr.RequestedProcedureID == f"RP{tag}1"
        assert us.RequestedProcedureDescription == "US Abdomen" and us.RequestedProcedureID == f"RP{tag}2"
        assert [
            (s.Modality, s.ScheduledStationAETitle, s.ScheduledProcedureStepStartTime)
            for s in (xr.ScheduledProcedureStepSequence[0], us.ScheduledProcedureStepSequence[0])
        ] == [("CR", "CR1", "090000"), ("US", "US1", "093000")]
        assert xr.StudyInstanceUID == accession_uid("2.25", f"A{tag}1")
        assert us.StudyInstanceUID == accession_uid("2.25", f"A{tag}2")
        assert {str(a.PatientName) for a in got} == {"Roe^Richard^^Mr"}
    assert len(rows(app)) == 2


@pytest.mark.parametrize("terminator", ["\n", "\r\n"], ids=["LF", "CRLF"])
async def test_orders_with_other_segment_terminators_are_accepted(running_engine: EngineApp, terminator: str) -> None:
    """Many RIS end segments with LF or CRLF instead of CR."""
    app = running_engine
    order = Order()
    body = order.message().replace(b"\r", terminator.encode())
    assert_aa(await send(app, body), control_id_of(body))
    (answer,) = await mwl(app, AccessionNumber=order.accession)
    assert answer.PatientID == order.patient and str(answer.PatientName) == "Doe^Jane^Anne^Mrs"
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == order.sps_id
    (row,) = stored(app, control_id_of(body))
    assert row["raw"] == body  # stored as received, terminators and all


async def test_resend_of_the_same_control_id_gets_the_same_ack_and_one_item(running_engine: EngineApp) -> None:
    app = running_engine
    order = Order()
    body = order.message("NW", "SC")
    first = await send_raw(app, body)
    again = await send_raw(app, body)
    assert first == again  # the stored answer, byte for byte (its MSH-7 and MSH-10 too)
    assert_aa(Message.parse(first), control_id_of(body))
    pyhl7 = await send_python_hl7(app, body)
    assert str(pyhl7).rstrip("\r") == first.decode("latin-1").rstrip("\r")

    assert [r["status"] for r in stored(app, control_id_of(body))] == ["processed", "duplicate", "duplicate"]
    (answer,) = await mwl(app, AccessionNumber=order.accession)
    assert answer.PatientID == order.patient
    assert len(rows(app)) == 1


NO_ORDER_NUMBERS = {"ORC-2": "", "ORC-3": "", "OBR-2": "", "OBR-3": ""}


@pytest.mark.parametrize(
    ("fields", "zds", "location", "erl"),
    [
        pytest.param({"PID-3": ""}, True, "PID-3.1", "PID^1^3^1^1", id="no PID-3"),
        pytest.param({"PID-5": ""}, True, "PID-5", "PID^1^5^1", id="no patient name"),
        # without ZDS-1 the study UID is derived from the accession number, else the filler, else the
        # placer number: with none of them it is missing (tests/orders/no_obr18_* map with one)
        pytest.param({"OBR-18": "", **NO_ORDER_NUMBERS}, False, "OBR-18", "OBR^1^18^1", id="nothing for the study UID"),
        # RequestedProcedureID falls back to the accession, filler and placer numbers: with none, it is missing
        pytest.param({"OBR-18": "", "OBR-19": "", **NO_ORDER_NUMBERS}, True, "OBR-19", "OBR^1^19^1",
                     id="no accession, no OBR-19, no order numbers"),
        pytest.param({"ORC-7": "", "OBR-27": ""}, True, "ORC-7.4.1", "ORC^1^7^1^4^1", id="no scheduled time"),
    ],
)
async def test_required_field_missing_is_refused_with_its_location(
    running_engine: EngineApp, fields: dict[str, str], zds: bool, location: str, erl: str
) -> None:
    app = running_engine
    order = Order()
    body = order.message("NW", "SC", zds=zds, fields=fields)
    raw_ack = await send_raw(app, body)
    ack = Message.parse(raw_ack)
    assert_ae(ack, 101, erl)
    assert ack.get("MSA-2") == control_id_of(body)
    assert ack.get("ERR-1.4.1") == "101"  # v2.3.1: ERR-1 (ELD) as well
    (row,) = stored(app, control_id_of(body))
    assert row["status"] == "error" and row["error_code"] == 101 and row["error_location"] == location
    assert row["raw"] == body  # stored as received
    assert row["ack"].encode("latin-1") == raw_ack  # a resend would get this very answer
    assert rows(app) == []
    assert await mwl(app, PatientID=order.patient) == []
    assert await mwl(app) == []
    # the same order with the field present goes through
    assert_aa(await send(app, order.message("NW", "SC", zds=zds)))
    assert accessions(await mwl(app)) == [order.accession]
