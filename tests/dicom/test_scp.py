"""The DICOM application: services plug in by registration, requests are routed by SOP class, clashes are refused.

Test-only services here stand in for the next ones (MPPS, ...): nothing in `engine.dicom.scp` knows them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event, EventType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DisplaySystem,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from sqlalchemy import Engine
from wl_helpers import make_item

from engine.dicom.scp import DicomApplication, DicomServiceRegistry, Handler, ServiceConflict, ServiceContext
from engine.dicom.services import DEFAULT_SERVICES, default_registry
from engine.dicom.services.echo import EchoService
from engine.dicom.services.mwl import WorklistService
from engine.store.worklist import insert_item

DISPLAY_SYSTEM_INSTANCE = "1.2.840.10008.5.1.1.40.1"  # the well-known Display System SOP instance


class DisplayService:
    """A test-only N-GET service (Display System Management); remembers whether the socket had TCP_NODELAY."""

    name = "display"
    sop_classes = (DisplaySystem,)

    def __init__(self) -> None:
        self.nodelay: list[int] = []

    def handlers(self) -> list[tuple[EventType, Handler]]:
        return [(evt.EVT_N_GET, self.on_get)]

    def on_get(self, event: Event) -> tuple[int, Dataset]:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]  # open association: it has a socket
        assert sock is not None
        self.nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        ds = Dataset()
        ds.Manufacturer = "TEST DISPLAYS"
        return 0x0000, ds


class StubService:
    """Claims SOP classes and binds whatever handlers it is given."""

    def __init__(self, name: str, sop_classes: tuple[str, ...], handlers: list[tuple[EventType, Handler]]) -> None:
        self.name = name
        self.sop_classes = sop_classes
        self._handlers = handlers

    def handlers(self) -> list[tuple[EventType, Handler]]:
        return self._handlers


def patient_root_find(_event: Event) -> Iterator[tuple[int, Dataset | None]]:
    answer = Dataset()
    answer.QueryRetrieveLevel = "PATIENT"
    answer.PatientID = "FROM-QR"
    yield 0xFF00, answer
    yield 0x0000, None


@pytest.fixture
def db(sqlite_engine: Engine) -> Engine:
    with sqlite_engine.begin() as conn:
        insert_item(conn, make_item(PatientID="P1", AccessionNumber="ACC1"))
    return sqlite_engine


def started(app: DicomApplication) -> DicomApplication:
    app.start()
    return app


def associate(port: int, *contexts: str) -> Any:
    ae = AE(ae_title="TESTSCU")
    for uid in contexts:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    return assoc


def find(assoc: Any, query: Dataset, model: str) -> tuple[list[Dataset], int]:
    answers, final = [], -1
    for status, identifier in assoc.send_c_find(query, model):
        if status.Status == 0xFF00:
            answers.append(identifier)
        else:
            final = status.Status
    return answers, final


def mwl_query(accession: str) -> Dataset:
    ds = Dataset()
    ds.PatientID = ""
    ds.AccessionNumber = accession
    return ds


def test_registered_service_plugs_in_without_touching_the_application(db: Engine) -> None:
    registry = default_registry()
    display = DisplayService()
    registry.add("display", lambda _context: display)
    services = registry.build([*DEFAULT_SERVICES, "display"], ServiceContext(db))
    app = started(DicomApplication("ENGINE", "127.0.0.1", 0, services))
    try:
        assoc = associate(app.port, DisplaySystem, ModalityWorklistInformationFind, Verification)
        try:
            status, attrs = assoc.send_n_get([0x00080070], DisplaySystem, DISPLAY_SYSTEM_INSTANCE)
            assert status.Status == 0x0000
            assert attrs.Manufacturer == "TEST DISPLAYS"
            answers, final = find(assoc, mwl_query("ACC1"), ModalityWorklistInformationFind)
            assert final == 0x0000 and [a.PatientID for a in answers] == ["P1"]
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        app.stop()
    assert display.nodelay and all(display.nodelay)  # the application set TCP_NODELAY on the accepted socket
    assert app.sop_classes == [Verification, ModalityWorklistInformationFind, DisplaySystem]


def test_one_event_two_services_routed_by_sop_class(db: Engine) -> None:
    qr = StubService("qr", (PatientRootQueryRetrieveInformationModelFind,), [(evt.EVT_C_FIND, patient_root_find)])
    no_find = StubService("study-root", (StudyRootQueryRetrieveInformationModelFind,), [])
    app = started(DicomApplication("ENGINE", "127.0.0.1", 0, [WorklistService(db), qr, no_find]))
    try:
        assoc = associate(
            app.port,
            ModalityWorklistInformationFind,
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
        )
        try:
            answers, final = find(assoc, mwl_query("ACC1"), ModalityWorklistInformationFind)
            assert final == 0x0000 and [a.PatientID for a in answers] == ["P1"]
            query = Dataset()
            query.QueryRetrieveLevel = "PATIENT"
            query.PatientID = ""
            answers, final = find(assoc, query, PatientRootQueryRetrieveInformationModelFind)
            assert final == 0x0000 and [a.PatientID for a in answers] == ["FROM-QR"]
            query.QueryRetrieveLevel = "STUDY"
            answers, final = find(assoc, query, StudyRootQueryRetrieveInformationModelFind)
            assert answers == [] and final == 0x0122  # accepted SOP class whose service does no C-FIND
        finally:
            assoc.release()
    finally:
        app.stop()


def test_a_sop_class_claimed_twice_is_refused_at_construction(db: Engine) -> None:
    other_mwl = StubService("other-mwl", (ModalityWorklistInformationFind,), [(evt.EVT_C_FIND, patient_root_find)])
    with pytest.raises(ServiceConflict, match="1.2.840.10008.5.1.4.31.*'mwl' and 'other-mwl'"):
        DicomApplication("ENGINE", "127.0.0.1", 0, [EchoService(), WorklistService(db), other_mwl])
    second_echo = StubService("echo-too", (Verification,), [])
    with pytest.raises(ServiceConflict, match="'echo' and 'echo-too'"):
        DicomApplication("ENGINE", "127.0.0.1", 0, [EchoService(), second_echo])


def test_other_clashes_are_refused(db: Engine) -> None:
    def user_id(_event: Event) -> tuple[bool, None]:
        return True, None

    a = StubService("a", (), [(evt.EVT_USER_ID, user_id)])
    b = StubService("b", (), [(evt.EVT_USER_ID, user_id)])
    with pytest.raises(ServiceConflict, match="EVT_USER_ID is claimed by DICOM services 'a' and 'b'"):
        DicomApplication("ENGINE", "127.0.0.1", 0, [a, b])
    with pytest.raises(ServiceConflict, match="given twice"):
        DicomApplication("ENGINE", "127.0.0.1", 0, [EchoService(), EchoService()])
    twice = StubService("twice", (Verification,), [(evt.EVT_C_ECHO, lambda _e: 0), (evt.EVT_C_ECHO, lambda _e: 0)])
    with pytest.raises(ServiceConflict, match="binds EVT_C_ECHO twice"):
        DicomApplication("ENGINE", "127.0.0.1", 0, [twice])
    nowhere = StubService("nowhere", (), [(evt.EVT_C_FIND, patient_root_find)])
    with pytest.raises(ServiceConflict, match="for no SOP class"):
        DicomApplication("ENGINE", "127.0.0.1", 0, [nowhere])
    # notification events may have any number of observers
    observers = [StubService(n, (), [(evt.EVT_CONN_OPEN, lambda _e: None)]) for n in ("x", "y")]
    assert DicomApplication("ENGINE", "127.0.0.1", 0, observers).sop_classes == []


def test_registry_names_and_refusals(db: Engine) -> None:
    registry = DicomServiceRegistry()
    assert registry.names() == []
    with pytest.raises(KeyError, match="unknown DICOM service 'mwl'"):
        registry.build(["mwl"], ServiceContext(db))
    registry = default_registry()
    assert registry.names() == ["echo", "mpps", "mwl"]
    with pytest.raises(ServiceConflict, match="registered twice"):
        registry.add("mwl", lambda _context: EchoService())
    with pytest.raises(ValueError, match="needs the store"):
        registry.build(["mwl"], ServiceContext())
    mwl = registry.build(["mwl"], ServiceContext(db, {"station_from_caller": True}))[0]
    assert isinstance(mwl, WorklistService) and mwl.station_from_caller
