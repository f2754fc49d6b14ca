"""Fixtures for the MPPS tests: the shipped engine on free ports, a RIS of our own (an MLLP
listener on a real socket that answers AA and keeps what it got) and a pynetdicom modality."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from tests.conftest import ROOT, SAMPLES, engine_env

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
_counter = itertools.count(1)


@dataclass
class FakeRis:
    """Plays the RIS: each MLLP frame is kept and answered AA with its MSH-10."""

    received: list[Message] = field(default_factory=list)
    server: asyncio.Server | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(SB)
                frame = (await reader.readuntil(EB + CR))[:-2]
                msg = Message.parse(frame)
                self.received.append(msg)
                self.arrived.set()
                ack = (f"MSH|^~\\&|RIS||ENGINE||20260101000000||ACK^O01|A{msg.control_id}|P|2.5.1\r"
                       f"MSA|AA|{msg.control_id}\r")
                writer.write(SB + ack.encode() + EB + CR)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_for(self, count: int, timeout: float = 60) -> list[Message]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.received) < count and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.received) >= count, f"the RIS got {len(self.received)} messages, expected {count}"
        return self.received


@pytest.fixture
async def ris() -> AsyncIterator[FakeRis]:
    fake = FakeRis()
    fake.server = await asyncio.start_server(fake._serve, "127.0.0.1", 0)
    yield fake
    fake.server.close()
    await fake.server.wait_closed()


@pytest.fixture
async def engine(tmp_path: Path, ris: FakeRis) -> AsyncIterator[EngineApp]:
    """The shipped engine.yaml and channels; the RIS status destination points at our RIS."""
    async for app in _engine(tmp_path, ris, None):
        yield app


@pytest.fixture
async def any_db_engine(tmp_path: Path, ris: FakeRis, db_url: str) -> AsyncIterator[EngineApp]:
    """As `engine`, on SQLite and on PostgreSQL (a schema of its own)."""
    async for app in _engine(tmp_path, ris, db_url):
        yield app


async def _engine(tmp_path: Path, ris: FakeRis, url: str | None) -> AsyncIterator[EngineApp]:
    env = engine_env(tmp_path, url)
    env["RIS_STATUS_PORT"] = str(ris.port)
    registry = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=env), registry)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def new_tag() -> str:
    return f"{uuid.uuid4().int % 9_000_000 + 1_000_000}{next(_counter) % 1000:03d}"


class Order:
    """One RIS order (from samples/hl7/orm_o01_ct.hl7) with numbers of its own."""

    def __init__(self) -> None:
        self.tag = new_tag()
        self.placer, self.filler, self.accession = f"PL{self.tag}", f"FL{self.tag}", f"A{self.tag}"
        self.procedure, self.sps_id, self.patient = f"RP{self.tag}", f"S{self.tag}", f"P{self.tag}"
        self.study_uid = f"1.2.826.0.1.3680043.8.498.{self.tag}"

    def orm(self) -> bytes:
        text = (SAMPLES / "orm_o01_ct.hl7").read_bytes().decode("ascii")
        for old, new in {
            "|ORM0001|": f"|C{self.tag}|",
            "PL1001": self.placer,
            "FL1001": self.filler,
            "ACC1001": self.accession,
            "RP1001": self.procedure,
            "SPS1001": self.sps_id,
            "100234^^^HOSP": f"{self.patient}^^^HOSP",
            "1.2.826.0.1.3680043.8.498.1001": self.study_uid,
        }.items():
            text = text.replace(old, new)
        return text.encode("ascii")

    async def place(self, app: EngineApp) -> None:
        async with MLLPClient("127.0.0.1", app.port_of("ris-orders"), read_timeout=30) as client:
            ack = Message.parse(await client.send(self.orm()))
        assert ack.get("MSA-1") == "AA", ack.to_er7()

    def n_create(self, *, scheduled: bool = True, **top: Any) -> Dataset:
        """A complete N-CREATE attribute list (PS3.4 F.7.2-1) for this order; `top` overrides."""
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Doe^Jane^Anne^^Mrs"
        ds.PatientID = self.patient
        ds.IssuerOfPatientID = "HOSP"
        ds.PatientBirthDate = "19800512"
        ds.PatientSex = "F"
        item = Dataset()
        item.StudyInstanceUID = self.study_uid if scheduled else f"1.2.826.0.1.3680043.8.499.{self.tag}"
        item.ReferencedStudySequence = []
        item.AccessionNumber = self.accession if scheduled else ""
        item.RequestedProcedureID = self.procedure if scheduled else ""
        item.RequestedProcedureDescription = "CT Head without contrast" if scheduled else ""
        item.ScheduledProcedureStepID = self.sps_id if scheduled else ""
        item.ScheduledProcedureStepDescription = ""
        item.ScheduledProtocolCodeSequence = []
        ds.ScheduledStepAttributesSequence = [item]
        ds.PerformedProcedureStepID = f"PPS{self.tag}"
        ds.PerformedStationAETitle = "CT1"
        ds.PerformedStationName = "CT ROOM 1"
        ds.PerformedLocation = "Room 1"
        ds.PerformedProcedureStepStartDate = "20261125"
        ds.PerformedProcedureStepStartTime = "101500"
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        ds.PerformedProcedureStepDescription = "CT head"
        ds.PerformedProcedureTypeDescription = ""
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTHEAD", "LOCAL", "CT Head without contrast"
        ds.ProcedureCodeSequence = [code]
        ds.PerformedProcedureStepEndDate = ""
        ds.PerformedProcedureStepEndTime = ""
        ds.Modality = "CT"
        ds.StudyID = ""
        ds.PerformedProtocolCodeSequence = []
        ds.PerformedSeriesSequence = []
        with config.disable_value_validation():  # malformed on purpose, in some tests
            for keyword, value in top.items():
                if value is None:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
        return ds

    def completed(self, series: int = 2, instances: int = 3) -> Dataset:
        """The final N-SET: COMPLETED with a Performed Series Sequence."""
        ds = Dataset()
        ds.PerformedProcedureStepStatus = "COMPLETED"
        ds.PerformedProcedureStepEndDate = "20261125"
        ds.PerformedProcedureStepEndTime = "103000"
        items = []
        for s in range(1, series + 1):
            item = Dataset()
            item.PerformingPhysicianName = "Tech^Tina"
            item.OperatorsName = "Op^Oscar"
            item.ProtocolName = f"Head {s}"
            item.SeriesInstanceUID = f"{self.study_uid}.{s}"
            item.SeriesDescription = f"Axial {s}"
            item.RetrieveAETitle = ""
            refs = []
            for i in range(1, instances + 1):
                ref = Dataset()
                ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                ref.ReferencedSOPInstanceUID = f"{self.study_uid}.{s}.{i}"
                refs.append(ref)
            item.ReferencedImageSequence = refs
            item.ReferencedNonImageCompositeSOPInstanceSequence = []
            items.append(item)
        ds.PerformedSeriesSequence = items
        return ds

    def mpps_uid(self, n: int = 1) -> str:
        return f"1.2.826.0.1.3680043.8.497.{self.tag}.{n}"


def _dimse(port: int, kind: str, ds: Dataset, uid: str | None) -> tuple[Dataset, Dataset | None]:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    try:
        if kind == "create":
            status, attrs = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        else:
            assert uid is not None
            status, attrs = assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
    finally:
        assoc.release()
    assert status is not None and "Status" in status, "no response (association aborted?)"
    return status, attrs


async def n_create(app: EngineApp, ds: Dataset, uid: str | None) -> Dataset:
    """The N-CREATE response's status dataset (Status, ErrorComment, ErrorID)."""
    return (await asyncio.to_thread(_dimse, app.scp.port, "create", ds, uid))[0]


async def n_set(app: EngineApp, ds: Dataset, uid: str) -> Dataset:
    return (await asyncio.to_thread(_dimse, app.scp.port, "set", ds, uid))[0]
